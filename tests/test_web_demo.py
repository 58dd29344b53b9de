"""`prefixcap export --web` end to end: a briefly trained quickstart model exported as a static page, served with
`python -m http.server`, opened in headless Chromium (web/e2e.mjs, playwright-core driving /usr/bin/chromium), given
shapes images through its file input; the page's captions, token ids, pixels and decoding must be exactly those of
the Python ONNX captioner on the same graphs.

Needs Chromium and web/node_modules (`apt-get install -y chromium && npm ci --prefix web`, as .ci/run does); without
them these tests fail, saying so. Screenshots go to $PREFIXCAP_ARTIFACTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
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
from prefixcap.web_demo import ORT_DIR, ORT_FILES, decode_like_python, probe_ids, token_table

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


@pytest.fixture(scope="module")
def server(exported):
    """`python -m http.server` serving the export, as the README says to: its URL."""
    process = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d",
                                str(exported)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        line = process.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        assert "port" in line, line
        yield f"http://127.0.0.1:{line.split(' port ')[1].split()[0]}/"
    finally:
        process.terminate()
        process.wait()


def browse(url: str, files: list[Path], screenshot: Path, probes: dict | None = None) -> dict:
    """Run web/e2e.mjs: what the page did, as JSON."""
    if problem := browser_problem():
        pytest.fail(f"the browser test cannot run: {problem}")
    command = ["node", str(WEB / "e2e.mjs"), "--url", url, "--screenshot", str(screenshot), "--chromium", str(CHROMIUM)]
    if probes is not None:
        probe_file = screenshot.with_suffix(".probes.json")
        probe_file.write_text(json.dumps(probes))
        command += ["--probes", str(probe_file)]
    done = subprocess.run([*command, *map(str, files)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"web/e2e.mjs failed (exit {done.returncode}):\n{done.stderr}"
    screenshot.with_suffix(".json").write_text(done.stdout)  # next to the screenshot: what the page did
    report = json.loads(done.stdout)
    assert report["errors"] == [] and report["failed"] == [] and report["blocked"] == [], report
    assert "results" in report, report["status"]  # the page did not get ready
    assert [r["name"] for r in report["results"]] == [f.name for f in files]
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
