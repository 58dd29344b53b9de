"""A system plugin from outside prefixcap's package exports to ONNX and captions with `--onnx` as it does in PyTorch.

The throwaway distribution below is installed for real (pip) and registers a system of its own: a prefix system that
appends a summary token (the mean of the prefix, scaled) after the prefix, which the builtin prefix system's graphs
would not compute. It declares its ONNX plan with prefixcap's public building blocks (prefixcap.onnx_parts), under
graph and input names of its own, and a three-graph image chain; export and the captioner follow its runtime section.
docs/writing-a-plugin.md quotes its system.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import prefixcap
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.onnx_captioner import OnnxCaptioner
from prefixcap.registry import reload_registry
from prefixcap.web_demo import ORT_MODULE, find_ort

from conftest import fit_batch, install_distribution, plugin_pyproject, run_cli

DIST = "prefixcap-summary-system"
FILES = {
    "pyproject.toml": plugin_pyproject(DIST, "0.1.0", "pcap_summary", {"summary": "pcap_summary.plugin"}),
    "pcap_summary/__init__.py": "",
    "pcap_summary/plugin.py": """
        from prefixcap import ComponentOptions, hookimpl

        class SummaryOptions(ComponentOptions):
            scale: float = 2.0  # the summary token is the prefix's mean times this

        @hookimpl
        def register_systems(register):
            register("summary-prefix", factory="pcap_summary.system:SummaryPrefixSystem", options=SummaryOptions,
                     description="A prefix system with a summary token (the prefix's mean) after the prefix")
            register("summary-no-onnx", factory="pcap_summary.system:WithoutPlan", options=SummaryOptions,
                     description="The same system, declaring no ONNX plan")
    """,
    "pcap_summary/system.py": """
        import torch
        from torch import nn

        from prefixcap.interfaces import System, SystemOutput
        from prefixcap.onnx_parts import (BATCH_DIMS, Graph, OnnxPlan, Runtime, example_pixels, merge_lora,
                                          prefix_decoder_graph)


        class Summarize(nn.Module):
            def __init__(self, scale):
                super().__init__()
                self.scale = scale

            def forward(self, prefix):  # (B, K, H) -> (B, K + 1, H)
                return torch.cat([prefix, prefix.mean(1, keepdim=True) * self.scale], dim=1)


        class SummaryPrefixSystem(System):
            def __init__(self, options, *, encoder, connector, decoder, losses, pretrained=True):
                super().__init__()
                self.encoder, self.connector, self.decoder = encoder, connector, decoder
                self.summarize = Summarize(options.scale)
                self.losses = nn.ModuleList(losses)

            def prefix(self, pixel_values):
                return self.summarize(self.connector(self.encoder(pixel_values)))

            def forward(self, batch):
                prefix = self.prefix(batch.pixel_values)
                inputs = torch.cat([prefix, self.decoder.embed(batch.input_ids)], dim=1)
                mask = torch.cat([batch.attention_mask.new_ones(prefix.shape[:2]), batch.attention_mask], dim=1)
                logits = self.decoder(inputs, mask, num_logits=batch.input_ids.shape[1] + 1)[:, :-1]
                return SystemOutput(logits=logits, labels=batch.labels, prefix=prefix)

            @torch.inference_mode()
            def generate(self, pixel_values, config):
                prefix = self.prefix(pixel_values)
                prompt = self.decoder.embed(self.decoder.prompt_ids()[None].expand(len(prefix), -1))
                inputs = torch.cat([prefix, prompt], dim=1)
                ids = self.decoder.generate(inputs, torch.ones(inputs.shape[:2], dtype=torch.long), config)
                return [t.strip() for t in self.decoder.tokenizer.batch_decode(ids, skip_special_tokens=True)]

            def onnx_export(self):
                lm, merged = merge_lora(self.decoder.model)
                pixels = example_pixels(self.encoder)
                with torch.no_grad():
                    tokens = self.encoder(pixels)
                    projected = self.connector(tokens)
                graphs = {
                    "image": Graph(self.encoder, (pixels,), ["pixel_values"], ["image_tokens"], (BATCH_DIMS,)),
                    "project": Graph(self.connector, (tokens,), ["image_tokens"], ["projected"], (BATCH_DIMS,)),
                    "summarize": Graph(self.summarize, (projected,), ["projected"], ["visual_prefix"], (BATCH_DIMS,)),
                    "step": prefix_decoder_graph(lm, prefix="visual_prefix"),
                }
                # The image graphs run once per image; the prefix goes to the first step only, then it is in the cache.
                runtime = Runtime(image=["image", "project", "summarize"], step="step", first_step={"visual_prefix": 1})
                tokenizer = self.decoder.tokenizer
                return OnnxPlan(graphs, runtime, tokenizer=tokenizer, prompt_ids=self.decoder.prompt_ids().tolist(),
                                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, lora_merged=merged)


        class WithoutPlan(SummaryPrefixSystem):
            def onnx_export(self):
                return None  # what System.onnx_export returns: a system written before plans existed
    """,
}
# 32 pixels: the tiny encoder's input size, so neither PyTorch nor the captioner resamples, and captions compare token
# by token. add_bos: the first step takes a prompt id after the prefix.
SHAPES = ShapesSource(ShapesOptions(image_size=32, train_size=8, test_size=12))
TRAIN = list(SHAPES.examples("train"))
IMAGES = [e.image for e in SHAPES.examples("test")] + [e.image for e in TRAIN]
RECIPE = {"system": {"name": "summary-prefix", "scale": 2.0}, "encoder": {"name": "siglip", "checkpoint": "tiny"},
          "connector": {"name": "mlp", "hidden": 64, "dropout": 0.0},
          "decoder": {"name": "smollm", "checkpoint": "tiny", "add_bos": True, "lora": {"r": 4, "dropout": 0.0}},
          "losses": [{"name": "caption-ce"}], "generate": {"max_new_tokens": 16}}  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_distribution(FILES, tmp_path_factory.mktemp("summary-src"), tmp_path_factory.mktemp("summary-site"))


def subprocess_env(site: Path) -> dict[str, str]:
    """What loads the distribution in a CLI subprocess."""
    return {"PREFIXCAP_LOAD_PLUGINS": DIST, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}  # fmt: skip


@pytest.fixture
def plugin_env(site, monkeypatch) -> dict[str, str]:
    """The distribution installed and loaded here; returns the environment that loads it in a CLI subprocess."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", DIST)
    reload_registry()
    return subprocess_env(site)


@pytest.fixture(scope="module")
def exported(site, tmp_path_factory) -> tuple[Path, Path, str]:
    """The plugin's system trained briefly, saved as a run's final/ and exported by `prefixcap export`: (run
    directory, export directory, what the command printed)."""
    run = tmp_path_factory.mktemp("summary-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        patch.setenv("PREFIXCAP_LOAD_PLUGINS", DIST)
        reload_registry()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model trains fastest on one thread, the more so on a shared machine
        try:
            torch.manual_seed(0)
            system = prefixcap.compose(RECIPE)
            assert type(system).__module__ == "pcap_summary.system"  # the plugin's, from outside prefixcap
            # Enough to write captions that differ between images and end, not to be right.
            fit_batch(system, [e.image for e in TRAIN], [e.captions[0] for e in TRAIN], steps=300, lr=3e-3)
            system.save(run / "final")
        finally:
            torch.set_num_threads(threads)
    done = run_cli("export", str(run), "--out", str(run / "onnx"), env=subprocess_env(site))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return run, run / "onnx", done.stdout


def test_a_system_plugin_exports_and_captions_with_onnx_as_with_torch(exported, plugin_env, tmp_path):
    run, directory, printed = exported
    assert "summarize.onnx" in printed
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["system"] == "summary-prefix" and list(manifest["graphs"]) == ["image", "project", "summarize",
                                                                                     "step"]  # fmt: skip
    assert manifest["runtime"]["first_step"] == {"visual_prefix": 1} and manifest["lora_merged"] is True
    loaded = prefixcap.load(run / "final")
    summary = manifest["graphs"]["summarize"]["outputs"][0]
    assert summary["shape"] == ["batch", loaded.connector.output_tokens(loaded.encoder.num_tokens) + 1, 64]
    prompt = loaded.decoder.prompt_ids().tolist()
    assert manifest["tokens"]["prompt_ids"] == prompt and len(prompt) == 1  # BOS

    # token for token: the captioner's greedy ids are the PyTorch decoder's, given the plugin's own prefix
    captioner = OnnxCaptioner(directory)
    pixels = captioner.pixel_values(IMAGES)
    assert np.array_equal(pixels, loaded.encoder.preprocess(IMAGES).numpy())
    with torch.no_grad():
        prefix = loaded.prefix(torch.from_numpy(pixels))
        inputs = torch.cat([prefix, loaded.decoder.embed(torch.tensor([prompt] * len(IMAGES)))], dim=1)
        eager = loaded.decoder.generate(inputs, torch.ones(inputs.shape[:2], dtype=torch.long), loaded.generate_config)
    eos = loaded.decoder.tokenizer.eos_token_id
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in eager.tolist()]
    ids = captioner.generate(pixels)
    assert ids == expected and any(row[-1] == eos for row in ids)

    # and through the command line, as a user captions a folder
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(IMAGES):
        image.save(folder / f"{i:02d}.png")
    done = run_cli("caption", "--onnx", str(directory), str(folder), "--format", "jsonl", "--raw",
                   env={"PREFIXCAP_LOAD_PLUGINS": ""})  # the export alone: no plugin needed to caption
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == [f"{i:02d}.png" for i in range(len(IMAGES))]
    captions = loaded.caption(IMAGES)
    assert [r["caption"] for r in rows] == captions and len(set(captions)) > 1


# caption.js, the browser page's captioner, in Node with onnxruntime-web's wasm backend (what the page loads): one
# image at a time, greedy ids.
CAPTION_JS = """
import { readFileSync } from 'node:fs';
const { dir, pixels, ortModule, captionJs } = JSON.parse(readFileSync(0, 'utf8'));
const ort = await import(ortModule);
const { Captioner } = await import(captionJs);
ort.env.wasm.numThreads = 1;
const manifest = JSON.parse(readFileSync(`${dir}/manifest.json`, 'utf8'));
const sessions = {};
for (const [name, graph] of Object.entries(manifest.graphs)) {
  sessions[name] = await ort.InferenceSession.create(readFileSync(`${dir}/${graph.file}`));
}
const captioner = new Captioner(ort, manifest, sessions, { skip: [] }, 'fp32', manifest.runtime);
const all = new Float32Array(new Uint8Array(readFileSync(pixels)).buffer);
const side = manifest.image.size;
const size = 3 * side * side;
const ids = [];
for (let i = 0; i < all.length / size; i++) {
  const image = new ort.Tensor('float32', all.slice(i * size, (i + 1) * size), [1, 3, side, side]);
  ids.push(await captioner.generate(image));
}
process.stdout.write(JSON.stringify(ids));
"""


def test_the_browser_captioner_follows_the_plugin_runtime_too(exported, tmp_path):
    """web/caption.js reads the same runtime section: its ids equal OnnxCaptioner's, one image per call."""
    _, directory, _ = exported
    if shutil.which("node") is None:
        pytest.fail("node (v20 or newer) is not on PATH (the browser page's tests need it too)")
    dist, _ = find_ort()  # web/node_modules/onnxruntime-web (`npm ci --prefix web`), or an ExportError saying so
    captioner = OnnxCaptioner(directory)
    pixels = captioner.pixel_values(IMAGES)
    pixels.astype("<f4").tofile(tmp_path / "pixels.bin")
    payload = {"dir": str(directory), "pixels": str(tmp_path / "pixels.bin"), "ortModule": (dist / ORT_MODULE).as_uri(),
               "captionJs": (Path(prefixcap.__file__).parent / "web" / "caption.js").as_uri()}  # fmt: skip
    done = subprocess.run(["node", "--input-type=module", "-e", CAPTION_JS], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [captioner.generate(pixels[i : i + 1])[0] for i in range(len(IMAGES))]


def test_a_system_plugin_without_a_plan_is_told_how_to_export(plugin_env, tmp_path):
    torch.manual_seed(0)
    prefixcap.compose({**RECIPE, "system": "summary-no-onnx"}).save(tmp_path / "saved")
    done = run_cli("export", str(tmp_path / "saved"), "--out", str(tmp_path / "onnx"), env=plugin_env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: system 'summary-no-onnx' (from distribution {DIST}) declares no ONNX "
                                   "graphs: implement System.onnx_export, see docs/writing-a-plugin.md")  # fmt: skip
    assert not (tmp_path / "onnx").exists()
