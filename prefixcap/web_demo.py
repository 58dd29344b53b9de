"""Alt text in the browser: ``prefixcap export RUN --out DIR --web`` writes a static page that captions images with
onnxruntime-web, from files in DIR only (no CDN, no network: `python -m http.server -d DIR` is enough).

    export_web("runs/quickstart", "quickstart-web")          # int8 graphs by default; int8=False: fp32 only

DIR holds a normal export (prefixcap.export: graphs, tokenizer, manifest.json, so `prefixcap caption --onnx DIR`
works on it too) plus:

    index.html, app.js     the page: pick or drop images, each caption with its time and a ready-to-copy alt="..."
    style.css              its style (a file: index.html's Content-Security-Policy allows nothing inline)
    caption.js             the captioner, a port of prefixcap.onnx_captioner.OnnxCaptioner: preprocessing (PIL's
                           float bicubic resampler, bit for bit), greedy decoding with the KV cache as the manifest's
                           runtime section says (any system's export), detokenisation
    tokens.web.json        the token table caption.js decodes with (below)
    ort/                   onnxruntime-web's wasm backend, copied from its npm package (web/package.json pins it)

manifest.json gains a "web" section: the graphs the page loads ("int8" or "fp32"; ?graphs=fp32 in the page's URL
picks the others when both were written), the token table and the runtime files.

The page trusts nothing in manifest.json to point elsewhere: every file it names must be a relative path inside DIR
(no scheme such as data: or http:, no leading / or //, no ..), or the page shows why it refused and loads nothing;
and index.html's Content-Security-Policy lets it load scripts, styles, data and images from its own origin only
(plus WebAssembly, which onnxruntime-web compiles, and blob: images, the thumbnails of the chosen files).

Detokenisation: caption.js cannot run the tokenizers library, so the export writes each token's string and the rule
that joins them (byte-level BPE: every token's characters stand for bytes, joined and read as UTF-8; Metaspace:
"▁" is a space, dropped on the first token; no decoder: tokens joined by spaces), the special ids to skip, the
clean-ups and the characters Python's str.strip() strips. The rule is then checked, in Python, against
tokenizers' own decode (as OnnxCaptioner.caption decodes) on every token alone, the vocabulary in runs and random
sequences; a tokenizer it cannot reproduce is refused with an ExportError before anything is written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from prefixcap.onnx_captioner import CLEAN_UP_PROBE, CLEAN_UPS, ExportError

TEMPLATES = Path(__file__).resolve().parent / "web"
PAGE_FILES = ("index.html", "style.css", "app.js", "caption.js")
TOKEN_TABLE = "tokens.web.json"
TABLE_FORMAT = "prefixcap-web-tokens/1"
# onnxruntime-web's ESM entry for the wasm backend, and the two files it fetches at run time (checked with the
# browser's request log in tests/test_web_demo.py): the emscripten glue and the SIMD build. One build serves one
# thread and many; caption.js asks for one thread, which needs no cross-origin isolation headers.
ORT_MODULE = "ort.wasm.min.mjs"
ORT_FILES = (ORT_MODULE, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ORT_DIR = "ort"
ORT_DIST_ENV = "PREFIXCAP_ORT_DIST"
# Where `npm ci --prefix web` puts it in a source checkout.
DEFAULT_ORT_DIST = Path(__file__).resolve().parent.parent / "web" / "node_modules" / "onnxruntime-web" / "dist"
# Texts whose encodings join the probes: captions, the clean-up cases, odd whitespace, multi-byte characters.
SAMPLE_TEXTS = (CLEAN_UP_PROBE, "a red circle, a blue square and a green triangle from left to right.",
                " two  spaces\tand a tab ", "\x1c\x85\u00a0\ufeff edges \u3000", "Ünïcödé — 日本語 🙂 ﬁ")  # fmt: skip


def export_web(source: str | Path, out: str | Path, *, int8: bool = True, ort_dist: str | Path | None = None
               ) -> dict[str, Any]:  # fmt: skip
    """Export the system saved in ``source`` (or a run directory's final/) as a static captioning page in ``out``;
    returns the manifest written there. ``ort_dist``: onnxruntime-web's dist/ folder (default: $PREFIXCAP_ORT_DIST,
    else web/node_modules/onnxruntime-web/dist in the source checkout)."""
    dist, ort_version = find_ort(ort_dist)  # before the slow part: a missing npm install costs no export
    from prefixcap.export import export_system  # imports torch: only once there is something to export

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to ``out`` and moved in only when complete, so that a refused tokenizer leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp)
        manifest = export_system(source, staging, int8=int8)
        tokenizer = Tokenizer.from_file(str(staging / manifest["tokens"]["tokenizer"]))
        table = token_table(tokenizer, manifest["tokens"]["decode"])
        (staging / TOKEN_TABLE).write_text(json.dumps(table, ensure_ascii=False, separators=(",", ":")))
        for name in PAGE_FILES:
            shutil.copyfile(TEMPLATES / name, staging / name)
        (staging / ORT_DIR).mkdir()
        for name in ORT_FILES:
            shutil.copyfile(dist / name, staging / ORT_DIR / name)
        written = [TOKEN_TABLE, *PAGE_FILES, *(f"{ORT_DIR}/{name}" for name in ORT_FILES)]
        manifest["files"].update({name: (staging / name).stat().st_size for name in written})
        manifest["web"] = {
            "graphs": "int8" if int8 else "fp32",
            "tokens": TOKEN_TABLE,
            "runtime": {"package": "onnxruntime-web", "version": ort_version, "module": f"{ORT_DIR}/{ORT_MODULE}",
                        "wasm_paths": f"{ORT_DIR}/", "threads": 1},
        }  # fmt: skip
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.mkdir(exist_ok=True)
        (out / ORT_DIR).mkdir(exist_ok=True)
        for path in [*staging.iterdir(), *(staging / ORT_DIR).iterdir()]:
            if path.is_file():
                os.replace(path, out / path.relative_to(staging))
    return manifest


def find_ort(ort_dist: str | Path | None = None) -> tuple[Path, str]:
    """onnxruntime-web's dist/ folder and the package's version; an ExportError saying how to get it if missing."""
    given = ort_dist or os.environ.get(ORT_DIST_ENV)
    dist = Path(given) if given else DEFAULT_ORT_DIST
    missing = [name for name in ORT_FILES if not (dist / name).is_file()]
    if missing:
        where = "" if given else " (pass --ort-dist DIR or set PREFIXCAP_ORT_DIST to use another copy)"
        raise ExportError(f"--web needs onnxruntime-web's {', '.join(missing)} in {dist}: run `npm ci --prefix web` "
                          f"in the prefixcap source checkout{where}")  # fmt: skip
    try:
        version = json.loads((dist.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        version = "unknown"
    return dist, version


# --- detokenisation ------------------------------------------------------------------------------------------------


def byte_level_alphabet() -> dict[str, int]:
    """The character byte-level BPE writes for each byte (GPT-2's bytes_to_unicode), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = byte_level_alphabet()
# What str.strip() strips (str.isspace: \x1c-\x1f and \x85 included, U+FEFF not), which JS's trim() does not match.
PY_WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def token_table(tokenizer: Tokenizer, decode: dict[str, Any]) -> dict[str, Any]:
    """The table caption.js decodes with, checked to reproduce tokenizers' decode; ExportError if it cannot."""
    spec = json.loads(tokenizer.to_str())
    kind = (spec.get("decoder") or {}).get("type", "none")
    rules = {"ByteLevel": "byte-level", "Metaspace": "metaspace", "none": "plain"}
    if kind not in rules:
        raise ExportError(f"--web: the browser page cannot decode this tokenizer's text: its decoder is {kind}, and "
                          "the page reproduces ByteLevel (byte-level BPE), Metaspace or none (plain words)")  # fmt: skip
    special = tokenizer.get_added_tokens_decoder()
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), 1 + max(special, default=0))
    table = {
        "format": TABLE_FORMAT,
        "decoder": rules[kind],
        "pieces": [tokenizer.id_to_token(i) for i in range(size)],  # None for ids the tokenizer does not know
        "skip": sorted(i for i, t in special.items() if t.special) if decode["skip_special_tokens"] else [],
        "clean_ups": [list(pair) for pair in CLEAN_UPS] if decode["clean_up_tokenization_spaces"] else [],
        "strip": PY_WHITESPACE if decode["strip"] else "",
    }
    if kind == "Metaspace":
        table["replacement"] = spec["decoder"]["replacement"]
        table["prepend"] = spec["decoder"].get("prepend_scheme", "always") != "never"
    verify(tokenizer, table)
    return table


def decode_like_js(table: dict[str, Any], ids: list[int]) -> str:
    """caption.js's decode(), step for step: what the browser will write for ``ids``."""
    skip, known = set(table["skip"]), range(len(table["pieces"]))
    pieces = [p for i in ids if i in known and i not in skip and (p := table["pieces"][i]) is not None]
    if table["decoder"] == "byte-level":
        data = b"".join(piece_bytes(p) for p in pieces)
        text = data.decode("utf-8", errors="replace")  # as TextDecoder('utf-8', {ignoreBOM: true}) reads it
    elif table["decoder"] == "metaspace":
        mark = table["replacement"]
        text = "".join(p.replace(mark, "" if i == 0 and table["prepend"] else " ") for i, p in enumerate(pieces))
    else:
        text = " ".join(pieces)
    for old, new in table["clean_ups"]:
        text = text.replace(old, new)
    return text.strip(table["strip"]) if table["strip"] else text


def piece_bytes(piece: str) -> bytes:
    """A byte-level token's bytes; a token with a character outside the byte alphabet (an added token) is its UTF-8,
    as tokenizers' ByteLevel decoder reads it."""
    try:
        return bytes(BYTE_LEVEL[c] for c in piece)
    except KeyError:
        return piece.encode()


def decode_like_python(tokenizer: Tokenizer, table: dict[str, Any], ids: list[list[int]]) -> list[str]:
    """OnnxCaptioner.caption's decoding of ``ids``: tokenizers' decode, the clean-ups, str.strip()."""
    texts = tokenizer.decode_batch(ids, skip_special_tokens=bool(table["skip"]))
    for old, new in table["clean_ups"]:
        texts = [t.replace(old, new) for t in texts]
    return [t.strip() for t in texts] if table["strip"] else texts


def probe_ids(tokenizer: Tokenizer, size: int, seed: int = 0) -> list[list[int]]:
    """Id sequences to check decoding on: every id alone, the vocabulary in runs of 8 (in order and shuffled, so
    that multi-byte characters split across tokens meet), random sequences and the encodings of SAMPLE_TEXTS."""
    rng = random.Random(seed)
    ids = list(range(size))
    shuffled = rng.sample(ids, len(ids))
    probes = [[i] for i in ids]
    probes += [order[k : k + 8] for order in (ids, shuffled) for k in range(0, size, 8)]
    probes += [[rng.randrange(size) for _ in range(rng.randint(2, 24))] for _ in range(500)]
    probes += [tokenizer.encode(text, add_special_tokens=False).ids for text in SAMPLE_TEXTS]
    return probes


def verify(tokenizer: Tokenizer, table: dict[str, Any]) -> None:
    probes = probe_ids(tokenizer, len(table["pieces"]))
    expected = decode_like_python(tokenizer, table, probes)
    for ids, want in zip(probes, expected):
        got = decode_like_js(table, ids)
        if got != want:
            raise ExportError(f"--web: the browser page would decode token ids {ids[:12]} as {got!r}, not {want!r} "
                              f"as the tokenizer does; this tokenizer ({table['decoder']} decoding) is not supported")  # fmt: skip
