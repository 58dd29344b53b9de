"""`prefixcap export --web` end to end: a briefly trained quickstart model exported as a static page, served with
`python -m http.server`, opened in headless Chromium (web/e2e.mjs, playwright-core driving /usr/bin/chromium), given
shapes images through its file input; the page's captions, token ids, pixels and decoding must be exactly those of
the Python ONNX captioner on the same graphs. And a tiny system with language adapters (tests/test_languages.py's),
exported the same way: its page's language menu, and its captions in a language equal to OnnxCaptioner(lang=...)'s.

Needs Chromium and web/node_modules (`apt-get install -y chromium && npm ci --prefix web`, as .ci/run does); without
them these tests fail, saying so. Screenshots go to $PREFIXCAP_ARTIFACTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image
from tokenizers import Tokenizer, decoders, models

from prefixcap.caption import tidy_alt_text
from prefixcap.cli import cli
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.images import open_image
from prefixcap.onnx_captioner import ExportError, OnnxCaptioner
from prefixcap.web_demo import ORT_DIR, ORT_FILES, decode_like_python, export_web, probe_ids, token_table

REPO = Path(__file__).resolve().parent.parent
WEB = REPO / "web"
CHROMIUM = Path(os.environ.get("PREFIXCAP_CHROMIUM", "/usr/bin/chromium"))
TIDY_PROBES = ["an image of a red circle", "This is a close-up photo showing  a cat", "", "   ", "a b c?",
               "on the left of " * 12, "x" * 200, "🙂" * 130, "ß and ǆ first", "ſtrange", "ends with a dash -",
               "picture of", "it is an illustration depicting a\x1cred\x85square\u3000\ufeff"]  # fmt: skip


def browser_problem() -> str | None:
    if shutil.which("node") is None:
        return "node (v20 or newer) is not on PATH"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium`"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in web/node_modules: run `npm ci --prefix web`"
    return None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    directory = Path(os.environ.get("PREFIXCAP_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> Path:
    """The quickstart trained for 300 steps (conftest.quickstart_short, which tests/test_learning.py holds to 85% of
    held-out scenes stated exactly), exported with `prefixcap export RUN --out DIR --web`: DIR."""
    if problem := browser_problem():  # before minutes of training
        pytest.fail(f"the browser test cannot run: {problem}")
    trained = request.getfixturevalue("quickstart_short")
    out = tmp_path_factory.mktemp("web") / "web"
    result = CliRunner().invoke(cli, ["export", str(trained.run_dir), "--out", str(out), "--web"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Four shapes images at the model's size (64), one that must be resized (96x80) and one with transparency."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, example in enumerate(ShapesSource(ShapesOptions()).examples("test")):
        if i == 4:
            break
        paths.append(folder / f"shapes-{i}.png")
        example.image.save(paths[-1])
    big = ShapesSource(ShapesOptions(image_size=96)).example("test", 4).image.crop((0, 8, 96, 88))
    paths.append(folder / "resized-96x80.png")
    big.save(paths[-1])
    rgba = ShapesSource(ShapesOptions()).example("test", 5).image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(40, 255, 64).astype(np.uint8), (64, 1))))
    paths.append(folder / "transparent.png")
    rgba.save(paths[-1])
    return paths


@contextlib.contextmanager
def serving(folder: Path):
    """`python -m http.server` serving ``folder``, as the README says to: its URL."""
    process = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d",
                                str(folder)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        line = process.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        assert "port" in line, line
        yield f"http://127.0.0.1:{line.split(' port ')[1].split()[0]}/"
    finally:
        process.terminate()
        process.wait()


@pytest.fixture(scope="module")
def server(exported):
    """The export, served: its URL."""
    with serving(exported) as url:
        yield url


def browse(url: str, files: list[Path], screenshot: Path, probes: dict | None = None,
           langs: list[str] | None = None) -> dict:  # fmt: skip
    """Run web/e2e.mjs: what the page did, as JSON. ``langs``: caption the files once in each of these languages,
    chosen in turn in the page's language menu (the results in that order)."""
    if problem := browser_problem():
        pytest.fail(f"the browser test cannot run: {problem}")
    command = ["node", str(WEB / "e2e.mjs"), "--url", url, "--screenshot", str(screenshot), "--chromium", str(CHROMIUM)]
    if probes is not None:
        probe_file = screenshot.with_suffix(".probes.json")
        probe_file.write_text(json.dumps(probes))
        command += ["--probes", str(probe_file)]
    if langs is not None:
        command += ["--langs", ",".join(langs)]
    done = subprocess.run([*command, *map(str, files)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"web/e2e.mjs failed (exit {done.returncode}):\n{done.stderr}"
    screenshot.with_suffix(".json").write_text(done.stdout)  # next to the screenshot: what the page did
    report = json.loads(done.stdout)
    assert report["errors"] == [] and report["failed"] == [] and report["blocked"] == [], report
    assert "results" in report, report["status"]  # the page did not get ready
    assert [r["name"] for r in report["results"]] == [f.name for f in files] * len(langs or [None])
    assert all("error" not in r for r in report["results"]), report["results"]
    return report


@pytest.fixture(scope="module")
def int8_page(exported, server, images, artifacts) -> dict:
    """The page as exported (int8 graphs), with decoding, tidying and pixel probes."""
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    table = json.loads((exported / "tokens.web.json").read_text())
    probes = {"decode": probe_ids(tokenizer, len(table["pieces"])), "tidy": TIDY_PROBES, "pixels": True}
    report = browse(server, images, artifacts / "web-demo-int8.png", probes)
    report["probes"] = probes
    return report


def test_page_is_self_contained(int8_page, exported, server):
    """Everything the page fetched is in the export folder: nothing from a CDN (e2e.mjs aborts any other origin)."""
    manifest = json.loads((exported / "manifest.json").read_text())
    fetched = {url.removeprefix(server) for url in int8_page["requests"]}
    graphs = {graph["int8_file"] for graph in manifest["graphs"].values()}
    runtime = {f"{ORT_DIR}/{name}" for name in ORT_FILES}  # what this onnxruntime-web version loads, no more
    assert fetched == {"", "style.css", "app.js", "caption.js", "manifest.json", "tokens.web.json"} | graphs | runtime
    assert "int8 graphs" in int8_page["status"]


def test_no_language_menu_without_languages(int8_page, exported):
    """An export without language adapters: the language menu stays hidden and disabled, English only, and every
    caption is English's (runtime.step's); the decoder was loaded for the first caption, not with the page."""
    assert json.loads((exported / "manifest.json").read_text()).get("languages", {}) == {}
    assert int8_page["menu"] == {"hidden": True, "disabled": True, "options": [["en", "English"]]}
    assert [row["lang"] for row in int8_page["results"]] == ["en"] * len(int8_page["results"])
    assert not any(url.endswith("decoder.int8.onnx") for url in int8_page["ready_requests"])
    assert int8_page["warnings"] == []


def test_int8_captions_match_onnxruntime(int8_page, exported, images):
    """Token for token what OnnxCaptioner writes with the same int8 graphs, one image per call as the page does
    (dynamic int8 quantises activations with one scale per tensor, so a batch's images affect each other).

    Native onnxruntime's extended graph optimisations fuse the int8 graphs (DynamicQuantizeMatMul,
    MatMulIntegerToFloat), and on x86 the fused kernels move logits by ~1e-2; onnxruntime-web computes what the
    unfused graph does (measured on one image: logits within 2e-6 of native onnxruntime with fusions off at every
    step, also when the page was given graphs pre-fused by native onnxruntime). Greedy ids agree unless two tokens
    are that close: of 60 shapes test images of a 300-step model, 59 agreed with OnnxCaptioner, 60 with unfused
    native int8 (and 60 in fp32). Both comparisons are made, so a failure says which it is."""
    captioner = OnnxCaptioner(exported, int8=True)
    unfused = OnnxCaptioner(exported, int8=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for name, graph in unfused.manifest["graphs"].items():
        file = str(exported / graph["int8_file"])
        unfused.sessions[name] = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    for path, row in zip(images, int8_page["results"]):
        image = open_image(path)
        pixels = captioner.pixel_values([image])
        assert row["ids"] == unfused.generate(pixels)[0], f"{path.name}: differs from unfused native int8"
        assert row["ids"] == captioner.generate(pixels)[0], (
            f"{path.name}: the page agrees with native int8 without graph fusions but not with OnnxCaptioner's fused "
            "kernels: a near-tie between two tokens (see this test's docstring)"
        )
        assert row["caption"] == captioner.caption([image])[0], path.name
        assert row["alt"] == tidy_alt_text(row["caption"])
        assert row["ms"] > 0
    # and the command line with the same graphs: `prefixcap caption --onnx DIR --int8`, one image per call
    done = subprocess.run([sys.executable, "-m", "prefixcap", "caption", "--onnx", str(exported), "--int8",
                           *map(str, images), "--batch-size", "1", "--tidy"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["alt"] for r in int8_page["results"]] == [json.loads(line)["caption"] for line in done.stdout.splitlines()]


def test_pixels_match_python_preprocessing(int8_page, exported, images):
    """Resizing (PIL's float bicubic, ported) and compositing over white give Python's pixels bit for bit."""
    captioner = OnnxCaptioner(exported, int8=True)
    for path, encoded in zip(images, int8_page["pixels"]):
        page = np.frombuffer(base64.b64decode(encoded), dtype="<f4").reshape(3, 64, 64)
        python = captioner.pixel_values([open_image(path)])[0]
        assert np.array_equal(page, python), (path.name, float(np.abs(page - python).max()))


def test_decoding_and_tidying_match_python(int8_page, exported):
    """The page's decode() reproduces tokenizers' on every token, runs of the vocabulary and random sequences
    (invalid UTF-8 included); its tidyAltText() reproduces prefixcap.caption.tidy_alt_text."""
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    table = json.loads((exported / "tokens.web.json").read_text())
    assert int8_page["decoded"] == decode_like_python(tokenizer, table, int8_page["probes"]["decode"])
    assert int8_page["tidied"] == [tidy_alt_text(text) for text in TIDY_PROBES]


def test_fp32_captions_match_caption_cli(exported, server, images, artifacts):
    """?graphs=fp32: the same captions and alt text as `prefixcap caption --onnx DIR` (which reads the fp32 graphs)."""
    report = browse(server + "?graphs=fp32", images, artifacts / "web-demo-fp32.png")
    assert "fp32 graphs" in report["status"]
    rows = {}
    for tidy in ("--tidy", "--raw"):
        done = subprocess.run([sys.executable, "-m", "prefixcap", "caption", "--onnx", str(exported), *map(str, images),
                               "--batch-size", "1", tidy], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows[tidy] = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["caption"] for r in report["results"]] == [r["caption"] for r in rows["--raw"]]
    assert [r["alt"] for r in report["results"]] == [r["caption"] for r in rows["--tidy"]]


# --- an export with languages --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def language_exported(tmp_path_factory) -> Path:
    """A tiny prefix system fitted to three colours with German and French adapters of random weights
    (tests/test_languages.py's trained and with_languages), saved and exported with fp32 graphs for the page (fp32:
    its captions are compared with OnnxCaptioner's, and int8's fused kernels can differ on a near-tie, see
    test_int8_captions_match_onnxruntime): its folder."""
    if problem := browser_problem():  # before the export
        pytest.fail(f"the browser test cannot run: {problem}")
    from test_languages import FULL, trained, with_languages

    system = trained(FULL)
    with_languages(system, "de", "fr")
    folder = tmp_path_factory.mktemp("languages")
    saved = system.save(folder / "saved")
    manifest = export_web(saved, folder / "web", int8=False)
    assert manifest["languages"] == {"de": "decoder_de", "fr": "decoder_fr"}, manifest["languages"]
    return folder / "web"


@pytest.fixture(scope="module")
def language_page(language_exported, images, artifacts) -> dict:
    """The page with languages: the images captioned in English, then in German (chosen in its language menu)."""
    with serving(language_exported) as url:
        report = browse(url, images, artifacts / "web-demo-languages.png", langs=["en", "de"])
    report["server"] = url
    return report


def test_language_menu_lists_the_exports_languages(language_page):
    assert language_page["menu"] == {"hidden": False, "disabled": False,
                                     "options": [["en", "English"], ["de", "Deutsch"], ["fr", "Français"]]}  # fmt: skip
    assert language_page["warnings"] == []


def test_step_graphs_load_when_first_used(language_page, language_exported):
    """The image graphs load with the page; English's decoder with the first English caption, German's with the first
    German one, and French's never (nothing was captioned in French)."""
    manifest = json.loads((language_exported / "manifest.json").read_text())
    files = {name: graph["file"] for name, graph in manifest["graphs"].items()}
    steps = {files[name] for name in ("decoder", "decoder_de", "decoder_fr")}
    image = {files[name] for name in manifest["runtime"]["image"]}
    server = language_page["server"]
    at_ready = {url.removeprefix(server) for url in language_page["ready_requests"]}
    fetched = {url.removeprefix(server) for url in language_page["requests"]}
    assert image <= at_ready and not steps & at_ready, at_ready
    assert fetched & steps == {files["decoder"], files["decoder_de"]}, fetched


def test_language_captions_match_onnxruntime(language_page, language_exported, images):
    """The page's captions in English and in German are token for token OnnxCaptioner's and OnnxCaptioner(lang="de")'s
    on the same fp32 graphs, one image per call as the page does; and German is not English."""
    rows = {lang: [r for r in language_page["results"] if r["lang"] == lang] for lang in ("en", "de")}
    assert [len(rows["en"]), len(rows["de"])] == [len(images)] * 2
    for lang in ("en", "de"):
        captioner = OnnxCaptioner(language_exported, lang=lang)  # "en": the system's own, runtime.step
        for path, row in zip(images, rows[lang]):
            image = open_image(path)
            assert row["ids"] == captioner.generate(captioner.pixel_values([image]))[0], (lang, path.name)
            assert row["caption"] == captioner.caption([image])[0], (lang, path.name)
            assert row["alt"] == tidy_alt_text(row["caption"])
    assert [r["ids"] for r in rows["de"]] != [r["ids"] for r in rows["en"]]


# --- caption.js in Node, no browser (fast) -------------------------------------------------------------------------


def run_caption_js(code: str, payload) -> object:
    """Run ``code`` as an ES module in Node with caption.js imported as ``js`` and the JSON ``payload`` as ``input``;
    it sets ``output``, which comes back as JSON."""
    if shutil.which("node") is None:
        pytest.fail("node (v20 or newer) is not on PATH")
    module = (REPO / "prefixcap" / "web" / "caption.js").as_uri()
    script = (f"import * as js from {json.dumps(module)}; import {{ readFileSync }} from 'node:fs';\n"
              f"const input = JSON.parse(readFileSync(0, 'utf8')); let output;\n{code}\n"
              "process.stdout.write(JSON.stringify(output));")  # fmt: skip
    done = subprocess.run(["node", "--input-type=module", "-e", script], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


PIXELS_JS = """
const ort = { Tensor: class { constructor(type, data, dims) { Object.assign(this, { type, data, dims }); } } };
output = input.map(({ spec, resize, rgba, width, height }) => {
  const captioner = Object.assign(Object.create(js.Captioner.prototype), { ort, manifest: { image: spec }, resize });
  return Array.from(captioner.pixelValues({ rgba: Uint8Array.from(rgba), width, height }).data);
});
"""


def test_preprocessing_matches_python_bit_for_bit():
    """Captioner.pixelValues against OnnxCaptioner._pixels: squash, crop and letterbox (its fill, or the mean), crop_pct,
    up- and downscaling, odd sizes and aspect ratios (either pass order of PIL's resampler), on random pixels; and
    another mode than the manifest's (the page's menu, Captioner.resize), as OnnxCaptioner's resize override."""
    rng = np.random.default_rng(0)
    clip = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    specs = [({"size": 64, "resize": "squash", "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}, None),
             ({"size": 32, "resize": "crop", "crop_pct": 0.9, **clip}, None),
             ({"size": 24, "resize": "crop", "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225]}, None),
             ({"size": 32, "resize": "letterbox", "crop_pct": 0.9, "fill": [0.1, 0.7, 0.9], **clip}, None),
             ({"size": 24, "resize": "letterbox", "crop_pct": 1.0, "fill": None, "mean": [0.5] * 3, "std": [0.5] * 3},
              None),
             ({"size": 32, "resize": "squash", "crop_pct": 1.0, **clip}, "letterbox"),  # an old manifest: no fill
             ({"size": 32, "resize": "letterbox", "crop_pct": 0.9, "fill": [0.1, 0.7, 0.9], **clip}, "crop")]  # fmt: skip
    sizes = [(64, 64), (96, 80), (80, 96), (37, 50), (130, 41), (41, 130), (17, 23), (200, 199), (33, 100)]
    cases = [(spec, resize, rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for spec, resize in specs
             for w, h in sizes]  # fmt: skip
    payload = [{"spec": spec, "resize": resize, "width": rgb.shape[1], "height": rgb.shape[0],
                "rgba": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]).ravel().tolist()}
               for spec, resize, rgb in cases]  # fmt: skip
    pages = run_caption_js(PIXELS_JS, payload)
    python = OnnxCaptioner.__new__(OnnxCaptioner)  # _pixels reads nothing but the manifest's image section
    for (spec, resize, rgb), page in zip(cases, pages):
        python.manifest = {"image": spec}
        want = python._pixels(Image.fromarray(rgb), resize)
        got = np.asarray(page, dtype=np.float32).reshape(want.shape)
        where = (spec["resize"], resize, spec["size"], rgb.shape)
        assert np.array_equal(got, want), (*where, float(np.abs(got - want).max()))


LANGUAGES_JS = """
output = input.map((manifest) => {
  const warnings = [];
  const languages = js.checkLanguages(manifest, manifest.runtime, (message) => warnings.push(message));
  return { languages: [...languages], warnings };
});
output.push(['de', 'fr', 'ru', 'pt-br', 'en', 'xx'].map(js.languageName));
"""


def test_manifest_languages_are_checked():
    """caption.js's checkLanguages: an export without languages (none, or written before them) has none; a tag that is
    no language tag, English, a graph that is not in the manifest, an image graph or a graph of other inputs is
    left out with a warning; and the menu's names."""
    def value(name: str) -> dict:
        return {"name": name, "dtype": "float32", "shape": [1]}

    step = {"file": "decoder.onnx", "inputs": [value("input_ids"), value("past_0")], "outputs": [value("logits")]}
    graphs = {"vision_encoder": {"file": "v.onnx", "inputs": [value("pixel_values")], "outputs": [value("x")]},
              "decoder": step, "decoder_de": {**step, "file": "de.onnx"}, "decoder_ru": {**step, "file": "ru.onnx"},
              "odd": {**step, "inputs": [value("input_ids")]}}  # fmt: skip
    runtime = {"image": ["vision_encoder"], "step": "decoder"}
    good = {"de": "decoder_de", "pt-br": "decoder_ru"}
    bad = {"DE": "decoder_de", "../x": "decoder_de", "de-": "decoder_de", "__proto__": "decoder_de", "en": "decoder_de",
           "fr": "decoder_fr", "it": None, "es": "vision_encoder", "nl": "odd", "ru": ["decoder_ru"],
           "toString": "decoder_de", "sv": "constructor"}  # fmt: skip
    manifests = [{"graphs": graphs, "runtime": runtime}, {"graphs": graphs, "runtime": runtime, "languages": {}},
                 {"graphs": graphs, "runtime": runtime, "languages": ["de"]},
                 {"graphs": graphs, "runtime": runtime, "languages": {**good, **bad}}]  # fmt: skip
    *checked, names = run_caption_js(LANGUAGES_JS, manifests)
    assert checked[:2] == [{"languages": [], "warnings": []}] * 2
    assert checked[2]["languages"] == [] and len(checked[2]["warnings"]) == 1
    assert checked[3]["languages"] == [["de", "decoder_de"], ["pt-br", "decoder_ru"]]
    warned = checked[3]["warnings"]
    assert len(warned) == len(bad) and all("is ignored" in w for w in warned), warned
    for tag in bad:
        assert any(f"language {json.dumps(tag)} is ignored" in w for w in warned), tag
    assert names == ["Deutsch", "Français", "Русский", "pt-br", "English", "xx"]


# --- refusals (fast: no model) ---------------------------------------------------------------------------------


def test_missing_onnxruntime_web_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "dist"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "prefixcap", "export", str(tmp_path), "--out", str(tmp_path / "out"),
                           "--web", "--ort-dist", str(empty)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: --web needs onnxruntime-web's ort.wasm.min.mjs")
    assert "Traceback" not in done.stderr
    assert "npm ci --prefix web" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def word_tokenizer(decoder=None) -> Tokenizer:
    vocab = {"[PAD]": 0, "[SEP]": 1, "a": 2, "red": 3, "▁a": 4, "▁red": 5, "▁▁circle": 6, "##s": 7, ".": 8, "d▁e": 9}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.add_special_tokens(["[PAD]", "[SEP]"])
    tokenizer.decoder = decoder
    return tokenizer


DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": True, "strip": True}


@pytest.mark.parametrize("decoder", [None, decoders.Metaspace(), decoders.Metaspace(prepend_scheme="never")],
                         ids=["plain", "metaspace", "metaspace-never"])  # fmt: skip
def test_word_and_metaspace_tokenizers_are_reproduced(decoder):
    table = token_table(word_tokenizer(decoder), DECODE)  # verified against tokenizers' decode, or ExportError
    assert table["skip"] == [0, 1] and table["decoder"] in ("plain", "metaspace")


def test_refuses_a_tokenizer_it_cannot_reproduce():
    with pytest.raises(ExportError, match="its decoder is WordPiece"):
        token_table(word_tokenizer(decoders.WordPiece()), DECODE)
    sequence = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    with pytest.raises(ExportError, match="its decoder is Sequence"):
        token_table(word_tokenizer(sequence), DECODE)
