"""Saved systems through transformers' Auto classes and pipelines, once ``import prefixcap.hf`` has registered them
(issue 21): AutoConfig, AutoModelForImageTextToText, pipeline("alt-text") and pipeline("image-text-to-text") caption
as prefixcap.load does, from a folder or a hub id, and never run a recipe's remote code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, pipeline

import prefixcap
import prefixcap.hf  # noqa: F401  the documented import: registers model type "prefixcap" and the alt-text task
from prefixcap import compose
from prefixcap.errors import SavedSystemError
from prefixcap.hf import PrefixcapConfig, PrefixcapForImageTextToText
from prefixcap.hf_config import ARCHITECTURE

from conftest import CAPTIONS, IMAGES, TINY, fit_batch



@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny prefix system trained until it tells the three images apart, saved; and prefixcap.load's captions."""
    torch.manual_seed(0)
    system = compose(TINY)
    fit_batch(system, IMAGES, CAPTIONS, 80)
    final = system.save(tmp_path_factory.mktemp("hf") / "final")
    captions = prefixcap.load(final).caption(IMAGES)  # persist reads manifest.json and ignores config.json
    assert captions == system.caption(IMAGES)
    # Captions a wrong image, wrong weights or a wrong decoding would change: one per image, the first learnt.
    assert len(set(captions)) == 3 and captions[0] == "a red square", captions
    return final, captions


def test_every_saved_system_has_a_config_json_that_names_no_code(saved):
    final, _ = saved
    config = json.loads((final / "config.json").read_text())
    assert config == {"model_type": "prefixcap", "architectures": [ARCHITECTURE], "system": "prefix",
                      "prefixcap_format": "prefixcap-system/1"}  # fmt: skip
    assert ARCHITECTURE == PrefixcapForImageTextToText.__name__
    loaded = AutoConfig.from_pretrained(final)
    assert type(loaded) is PrefixcapConfig and loaded.system == "prefix" and not getattr(loaded, "auto_map", None)


def test_auto_model_captions_as_prefixcap_load_does(saved, tmp_path):
    final, captions = saved
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert type(model) is PrefixcapForImageTextToText and not model.training
    assert model.caption(IMAGES) == captions
    ids = model.generate(pixel_values=model.system.encoder.preprocess(IMAGES))
    assert ids.dtype == torch.long and model.decode(ids) == captions
    # Generation options: the recipe's by default, overridden per call; one it cannot honour is refused, not ignored.
    assert model.generation_config.max_new_tokens == model.system.generate_config.max_new_tokens
    short = model.caption(IMAGES[:1], max_new_tokens=2)[0]
    assert short != captions[0] and captions[0].startswith(short)
    with pytest.raises(ValueError, match="generation option min_new_tokens=3: a prefixcap system takes max_new_tok"):
        model.caption(IMAGES[:1], min_new_tokens=3)
    # save_pretrained writes a prefixcap saved system, which both loaders read back.
    model.save_pretrained(tmp_path / "again")
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "again").caption(IMAGES) == captions
    assert prefixcap.load(tmp_path / "again").caption(IMAGES) == captions


def test_alt_text_pipeline_captions_images_and_paths(saved, tmp_path):
    final, captions = saved
    paths = []
    for i, image in enumerate(IMAGES):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    pipe = pipeline("alt-text", model=str(final))
    assert pipe(IMAGES[0]) == [{"generated_text": captions[0]}]
    expected = [[{"generated_text": c}] for c in captions]
    assert pipe(paths) == expected
    assert pipe(IMAGES, batch_size=2) == expected
    assert pipe(IMAGES[0], max_new_tokens=2)[0]["generated_text"] == "a red"


def test_image_text_to_text_pipeline_captions_and_continues_a_text(saved):
    final, captions = saved
    pipe = pipeline("image-text-to-text", model=str(final))
    assert pipe(IMAGES[0], text="") == [{"input_text": "", "generated_text": captions[0]}]
    assert [r["generated_text"] for r in pipe(IMAGES, text="")] == captions
    # The text is the caption's beginning: given the first word each image's caption starts with, greedy decoding
    # goes on as it did from the image alone.
    for image, caption in zip(IMAGES, captions):
        assert pipe(image, text="a")[0]["generated_text"] == caption
    with pytest.raises(ValueError, match="texts of different lengths in one batch"):
        pipe(IMAGES[:2], text=["", "a"])  # padding would sit between the image and the text


def test_a_hub_id_loads_from_the_hub_cache(saved, tmp_path):
    """A repository as the hub serves it (here from the hub's cache: the suite is offline, HF_HUB_OFFLINE=1)."""
    final, captions = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--prefixcap-test--tiny-alt-text"
    shutil.copytree(final, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = AutoModelForImageTextToText.from_pretrained("prefixcap-test/tiny-alt-text", cache_dir=tmp_path / "hub")
    assert model.caption(IMAGES) == captions
    pipe = pipeline("alt-text", model="prefixcap-test/tiny-alt-text", model_kwargs={"cache_dir": str(tmp_path / "hub")})
    assert pipe(IMAGES[1]) == [{"generated_text": captions[1]}]


def test_a_recipe_that_runs_remote_code_is_refused_whatever_transformers_is_told(saved, tmp_path):
    final, _ = saved
    shutil.copytree(final, tmp_path / "remote")
    manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    manifest["recipe"]["decoder"]["trust_remote_code"] = True
    (tmp_path / "remote" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SavedSystemError, match=r"its recipe sets trust_remote_code \(decoder.trust_remote_code\)"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "remote", trust_remote_code=True)
    with pytest.raises(SavedSystemError, match="its recipe sets trust_remote_code"):
        pipeline("alt-text", model=str(tmp_path / "remote"), trust_remote_code=True)


def test_the_crossattn_baseline_loads_and_captions_the_same_way(tmp_path):
    torch.manual_seed(0)
    system = compose({"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"}})
    fit_batch(system, IMAGES, CAPTIONS, 30)
    captions = system.caption(IMAGES)
    assert len(set(captions)) == 3 and captions[0].startswith("a red square"), captions
    final = system.save(tmp_path / "final")
    assert json.loads((final / "config.json").read_text())["system"] == "crossattn"
    assert AutoModelForImageTextToText.from_pretrained(final).caption(IMAGES) == captions
    assert pipeline("alt-text", model=str(final))(IMAGES) == [[{"generated_text": c}] for c in captions]


def test_only_the_documented_import_registers_and_plugins_stay_torch_free():
    code = (
        "import sys\n"
        "from prefixcap.cli import cli\n"
        "cli(['plugins', '--json'], standalone_mode=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'prefixcap.hf') if m in sys.modules))\n"
        "from transformers import AutoConfig\n"
        "try:\n"
        "    AutoConfig.for_model('prefixcap')\n"
        "except ValueError:\n"
        "    print('unknown before')\n"
        "import prefixcap.hf\n"
        "print(type(AutoConfig.for_model('prefixcap')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    assert out.stdout.splitlines()[-3:] == ["[]", "unknown before", "PrefixcapConfig"], out.stdout + out.stderr
