"""docs/writing-a-plugin.md, run: each worked example is read from the page, installed as a real distribution and
used the way its section says, so the page cannot drift from what works.

The page's convention: between ``<!-- example: <distribution> -->`` and ``<!-- end example -->``, a fenced block
whose first line is ``# <relative path>`` is that file of that distribution (the comment stays in the file: it is
valid Python, TOML and YAML). Other blocks (shell sessions, output) are prose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, fit_batch, run_cli
from prefixcap.registry import get_component, reload_registry

DOC = REPO / "docs" / "writing-a-plugin.md"
START = re.compile(r"^<!-- example: ([a-z0-9][a-z0-9-]*) -->$")
END = "<!-- end example -->"
FILE_LINE = re.compile(r"^# ((?:[\w.-]+/)*[\w.-]+\.(?:py|toml|yaml))$")
# Each example's distribution and the kind of component it registers: one per kind, all six.
KINDS = {"prefixcap-convnext": "encoder", "prefixcap-tokenmix": "connector", "prefixcap-pythia": "decoder",
         "prefixcap-focal": "loss", "prefixcap-globaltoken": "system", "prefixcap-numbered": "dataset"}  # fmt: skip
KIT = [dist for dist, kind in KINDS.items() if kind in ("encoder", "connector", "decoder")]


def read_examples(text: str) -> dict[str, dict[str, str]]:
    """{distribution: {path: text}} from the page; a file block outside an example, or one path twice, is an error
    (a file the page shows but this test would not run)."""
    examples: dict[str, dict[str, str]] = {}
    current: str | None = None
    lines = iter(enumerate(text.splitlines(), 1))
    for number, line in lines:
        if match := START.match(line):
            assert current is None, f"line {number}: example {match[1]} starts inside example {current}"
            assert match[1] not in examples, f"line {number}: a second example {match[1]}"
            current = match[1]
            examples[current] = {}
        elif line == END:
            assert current is not None, f"line {number}: {END} outside an example"
            current = None
        elif line.startswith("```"):
            block = []
            for _, inner in lines:
                if inner.startswith("```"):
                    break
                block.append(inner)
            path = FILE_LINE.match(block[0]) if block else None
            if path is None:
                continue
            assert current is not None, f"line {number}: file {path[1]} is in no example"
            assert path[1] not in examples[current], f"line {number}: {current} shows {path[1]} twice"
            examples[current][path[1]] = "\n".join(block) + "\n"
    assert current is None, f"example {current} never ends ({END})"
    return examples


EXAMPLES = read_examples(DOC.read_text())


def test_the_page_has_one_installable_example_per_kind():
    assert set(EXAMPLES) == set(KINDS)
    assert sorted(KINDS.values()) == sorted(["encoder", "connector", "decoder", "loss", "system", "dataset"])
    for dist, files in EXAMPLES.items():
        project = tomllib.loads(files["pyproject.toml"])
        assert project["project"]["name"] == dist
        assert project["project"]["entry-points"]["prefixcap"], f"{dist} has no prefixcap entry point"
        for package in project["tool"]["setuptools"]["packages"]:
            assert f"{package}/__init__.py" in files, f"{dist}: package {package} has no __init__.py on the page"


def test_reading_the_page_refuses_what_it_would_not_run():
    with pytest.raises(AssertionError, match="is in no example"):
        read_examples("```python\n# stray/module.py\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="shows a.py twice"):
        read_examples("<!-- example: a -->\n```\n# a.py\n```\n```\n# a.py\n```\n<!-- end example -->\n")
    with pytest.raises(AssertionError, match="never ends"):
        read_examples("<!-- example: a -->\n")
    assert read_examples("<!-- example: a -->\n```\n$ ls\n```\n```toml\n# b/c.toml\nx = 1\n```\n<!-- end example -->") \
        == {"a": {"b/c.toml": "# b/c.toml\nx = 1\n"}}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """Every example written out from the page and pip-installed into one site directory, in one pip run (a pip
    start is seconds): ({distribution: its source folder}, site)."""
    root, site = tmp_path_factory.mktemp("doc-examples"), tmp_path_factory.mktemp("doc-site")
    sources = {}
    for dist, files in EXAMPLES.items():
        sources[dist] = root / dist
        for rel, text in files.items():
            (root / dist / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / dist / rel).write_text(text)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), *map(str, sources.values())], check=True)  # fmt: skip
    return sources, site


def plugin_env(site: Path, dist: str, **extra: str) -> dict[str, str]:
    """A subprocess environment with ``dist`` installed (its site on the path) and the only plugin loaded."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PREFIXCAP_LOAD_PLUGINS": dist, "OMP_NUM_THREADS": "1",
            "COLUMNS": "200", **extra}  # fmt: skip


@pytest.fixture
def loaded(installed, monkeypatch):
    """Load one installed example in this process, as an installed plugin: loaded("prefixcap-focal")."""
    _, site = installed
    monkeypatch.syspath_prepend(str(site))

    def load(dist: str) -> None:
        monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", dist)
        reload_registry()

    return load


# The architecture fields of EleutherAI/pythia-70m-deduped's config.json: with it in the Hugging Face cache the kit
# compares the decoder example's `checkpoint: tiny` with the architecture of its default checkpoint (no weights needed).
PYTHIA = "EleutherAI/pythia-70m-deduped"
PYTHIA_CONFIG = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 512,
                 "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 6, "hidden_act": "gelu",
                 "max_position_embeddings": 2048, "rotary_emb_base": 10000, "rotary_pct": 0.25,
                 "use_parallel_residual": True, "tie_word_embeddings": False, "vocab_size": 50304, "bos_token_id": 0,
                 "eos_token_id": 0, "torch_dtype": "float16"}  # fmt: skip


def test_encoder_connector_and_decoder_examples_pass_their_own_conformance_tests(installed, tmp_path):
    """Each example's tests/ run as the page runs them, `python -m pytest` with the kit enabled by its
    pyproject.toml; all in one pytest process (each start imports torch; the kit loads only the distribution
    under test for each class, so the examples cannot affect each other)."""
    sources, site = installed
    hf_home = tmp_path / "hf"
    repo, commit = hf_home / "hub" / f"models--{PYTHIA.replace('/', '--')}", "0" * 40  # huggingface_hub's layout
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(PYTHIA_CONFIG))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for dist in KIT:
        options = tomllib.loads(EXAMPLES[dist]["pyproject.toml"])["tool"]["pytest"]["ini_options"]
        assert "-p prefixcap.testing" in options["addopts"], f"{dist}'s pyproject.toml does not enable the kit"
    tests = [str(sources[dist] / "tests") for dist in KIT]
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "prefixcap.testing", "--import-mode=importlib",
                           "-p", "no:cacheprovider", "-v", "-rfEs", f"--rootdir={sources[KIT[0]].parent}", *tests],
                          cwd=sources[KIT[0]].parent, env=plugin_env(site, ",".join(KIT), HF_HOME=str(hf_home)),
                          capture_output=True,
                          text=True, timeout=500)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    for dist in KIT:  # skips are the kit's own (a connector loads no checkpoint), never a whole class
        passed = re.findall(rf"^\S*{dist}/tests/\S+ PASSED", done.stdout, re.MULTILINE)
        assert len(passed) >= 7, f"{dist}: only {len(passed)} kit tests passed\n{done.stdout[-3000:]}"
    assert "TestPythia::test_tiny_form_is_the_real_architecture PASSED" in done.stdout, done.stdout[-3000:]


def test_loss_example_changes_what_training_does(loaded):
    """caption-focal at gamma 0 is caption-ce exactly; at its default it gives other gradients, and training on it
    alone teaches the captions (caption-ce falls)."""
    loaded("prefixcap-focal")
    assert get_component("loss", "caption-focal").provider.dist == "prefixcap-focal"
    import prefixcap

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue", "white")]
    captions = ["a red square", "a green square", "a blue square", "a white square"]

    def compose(losses):
        torch.manual_seed(0)
        return prefixcap.compose(encoder={"name": "siglip", "checkpoint": "tiny"},
                                 connector={"name": "mlp", "hidden": 32, "dropout": 0.0},
                                 decoder={"name": "smollm", "checkpoint": "tiny", "tiny": {"num_hidden_layers": 1},
                                          "finetune": "full"}, losses=losses)  # fmt: skip

    def connector_grad(system, batch):
        system.zero_grad()
        system.loss(batch)[0].backward()
        return torch.cat([p.grad.flatten() for p in system.connector.parameters()])

    ce = compose(["caption-ce"])
    batch = ce.make_batch(images, captions)
    plain = compose(["caption-ce", {"name": "caption-focal", "gamma": 0.0}])
    _, parts = plain.loss(batch)
    assert parts["FocalCaptionLoss"] == pytest.approx(parts["CaptionLoss"], rel=1e-5)
    focal = compose(["caption-focal"])
    assert not torch.allclose(connector_grad(focal, batch), connector_grad(ce, batch))

    caption_ce = ce.losses[0]
    before = caption_ce(focal(batch), batch).item()
    fit_batch(focal, images, captions, steps=8)
    with torch.no_grad():
        assert caption_ce(focal(batch), batch).item() < before - 1.0  # trained on focal loss alone


def test_dataset_example_trains_with_prefixcap_run(installed, loaded, tmp_path, monkeypatch):
    """`prefixcap run numbered.yaml` in the example's folder, on the folder its make_photos.py writes; `doctor` and
    `caption` as the page runs them (in this process: a CLI start is seconds)."""
    from click.testing import CliRunner

    from prefixcap.cli import cli

    sources, site = installed
    folder = sources["prefixcap-numbered"]
    env = plugin_env(site, "prefixcap-numbered", PREFIXCAP_CACHE=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "make_photos.py", "photos"], cwd=folder, check=True, env=env)
    monkeypatch.chdir(folder)
    loaded("prefixcap-numbered")
    doctor = CliRunner().invoke(cli, ["doctor", "numbered.yaml", "--set", "data.root=nowhere"])
    assert doctor.exit_code == 1 and "data.root 'nowhere': no such file or directory" in doctor.stdout, doctor.output
    run = run_cli("run", "numbered.yaml", "--out", str(tmp_path / "run"), env=env, cwd=folder)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["skipped_images"], metrics["steps"]) == (12, 0, 60)
    history = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert metrics["val_loss"] < history[0]["loss"] / 2  # the val split was read, and the captions were learnt
    captioned = CliRunner().invoke(cli, ["caption", str(tmp_path / "run"), "photos/val/images", "--format", "jsonl"])
    assert captioned.exit_code == 0, captioned.output
    rows = [json.loads(line) for line in captioned.stdout.splitlines()]
    assert len(rows) == 6 and "captioned 6 of 6 images" in captioned.stderr
    colours = [(folder / "photos" / "val" / "captions" / Path(r["path"]).with_suffix(".txt").name).read_text().split()[1]
               for r in rows]  # fmt: skip
    assert sum(colour in r["caption"].lower() for colour, r in zip(colours, rows)) >= 4, rows


def test_system_example_exports_and_captions_with_onnx_as_in_pytorch(loaded, tmp_path, monkeypatch):
    """compose a tiny global-token system, train it, save it; `prefixcap export` writes the graphs its onnx_export
    declares, and `prefixcap caption --onnx` gives PyTorch's captions, global token included."""
    from click.testing import CliRunner

    import prefixcap
    from prefixcap.cli import cli
    from prefixcap.data import ShapesOptions
    from prefixcap.data.shapes import ShapesSource
    from prefixcap.systems.prefix import PrefixSystem

    loaded("prefixcap-globaltoken")
    torch.manual_seed(0)
    system = prefixcap.compose(system="global-token", encoder={"name": "siglip", "checkpoint": "tiny"},
                               connector={"name": "mlp", "hidden": 32, "dropout": 0.0},
                               decoder={"name": "smollm", "checkpoint": "tiny", "tiny": {"num_hidden_layers": 1},
                                        "lora": {"r": 4, "dropout": 0.0}},
                               losses=["caption-ce"])  # fmt: skip
    assert type(system).__name__ == "GlobalTokenSystem" and system.num_prefix_tokens == 17
    # 32-pixel scenes: the tiny encoder's size, so neither runtime resamples and captions compare token by token.
    shapes = ShapesSource(ShapesOptions(image_size=32, train_size=8, test_size=6))
    train = list(shapes.examples("train"))
    fit_batch(system, [e.image for e in train], [e.captions[0] for e in train], steps=10)
    with torch.no_grad():  # the global token is no no-op: without it the decoder starts from other logits
        pixels = system.encoder.preprocess([e.image for e in train[:2]])
        mask = torch.ones(2, 17, dtype=torch.long)
        with_token = system.decoder(system.prefix(pixels), mask)
        without = system.decoder(PrefixSystem.prefix(system, pixels), mask[:, :16])
    assert not torch.allclose(with_token[:, -1], without[:, -1])
    system.save(tmp_path / "saved")
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i, example in enumerate(shapes.examples("test")):
        example.image.save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    exported = CliRunner().invoke(cli, ["export", "saved", "--out", "onnx"])
    assert exported.exit_code == 0, exported.output
    runtime = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["runtime"]
    assert runtime["image"] == ["vision_encoder", "connector", "global_token"]

    def captions(*args: str) -> list[str]:
        done = CliRunner().invoke(cli, ["caption", *args, "scenes", "--format", "jsonl", "--raw"])
        assert done.exit_code == 0 and "captioned 6 of 6 images" in done.stderr, done.output
        return [json.loads(line)["caption"] for line in done.stdout.splitlines()]

    onnx = captions("--onnx", "onnx")
    assert onnx == captions("saved") and any(onnx)
