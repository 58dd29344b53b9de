"""The Python API a notebook uses: compose gives a system ready to caption, a system composed from built parts saves
and loads, and prefixcap.train trains a recipe or a system composed in Python (issue 22)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import prefixcap
from prefixcap import SavedSystemError
from prefixcap.interfaces import Connector
from prefixcap.training import RunError

from prefixcap.registry import reload_registry

from conftest import CAPTIONS, IMAGES, TINY, fit_batch, install_distribution, plugin_pyproject

# Dropout on, as the mlp connector's default (0.1) and LoRA's (0.05) have it: what made two captions of one image differ.
DROPOUT = {**TINY, "connector": {"name": "mlp", "hidden": 32, "dropout": 0.5},
           "decoder": {**TINY["decoder"], "lora": {"r": 4, "dropout": 0.5}}}  # fmt: skip
SHAPES = {"name": "shapes", "train_size": 32, "val_size": 4, "test_size": 4}
QUICK = {"steps": 4, "batch_size": 4}
NO_EVAL = ["eval.clip_model=null", "eval.max_examples=4", "output.log_every_steps=2"]


def test_compose_returns_a_system_in_eval_mode_whose_captions_do_not_change():
    torch.manual_seed(0)
    system = prefixcap.compose(DROPOUT)
    assert not any(m.training for m in system.modules())
    fit_batch(system, IMAGES, CAPTIONS, steps=3)  # LoRA's B moves off zero, so its dropout would matter
    system.train()
    first = system.caption(IMAGES, max_new_tokens=6)
    assert system.training, "caption() puts the mode back"
    assert system.caption(IMAGES, max_new_tokens=6) == first
    system.eval()
    assert system.caption(IMAGES, max_new_tokens=6) == first


def test_a_system_composed_from_created_parts_saves_what_load_needs(tmp_path):
    torch.manual_seed(0)
    encoder = prefixcap.create("encoder", "siglip", {"checkpoint": "tiny"}, pretrained=True)
    decoder = prefixcap.create("decoder", "smollm", {"checkpoint": "tiny", "lora": {"r": 4, "dropout": 0.0}},
                               pretrained=True)  # fmt: skip
    connector = prefixcap.create("connector", "mlp", {"hidden": 32, "dropout": 0.0}, in_dim=encoder.dim,
                                 out_dim=decoder.hidden_size, in_tokens=encoder.num_tokens)  # fmt: skip
    loss = prefixcap.create("loss", "caption-ce", {}, hidden_size=decoder.hidden_size, pretrained=True)
    system = prefixcap.compose(encoder=encoder, connector=connector, decoder=decoder, losses=[loss])
    fit_batch(system, IMAGES, CAPTIONS, steps=3)
    system.save(tmp_path / "saved")
    recipe = json.loads((tmp_path / "saved" / "manifest.json").read_text())["recipe"]
    assert {recipe[slot]["name"] for slot in ("encoder", "connector", "decoder")} == {"siglip", "mlp", "smollm"}
    loaded = prefixcap.load(tmp_path / "saved")
    batch = system.make_batch(IMAGES, CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, system(batch).logits)
    assert loaded.caption(IMAGES) == system.caption(IMAGES)


class HandMadeConnector(Connector):
    """Built by hand, not through the registry: nothing says how to build it again."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)

    def output_tokens(self, in_tokens: int) -> int:
        return in_tokens

    def forward(self, tokens):
        return self.proj(tokens)


def test_a_system_with_a_hand_made_part_refuses_to_save_and_says_how_to_fix_it(tmp_path):
    torch.manual_seed(0)
    system = prefixcap.compose(TINY, connector=HandMadeConnector(64, 64))
    assert system.caption(IMAGES[:1], max_new_tokens=2)  # it works; only saving needs to know how it was built
    with pytest.raises(SavedSystemError, match=r"its connector was given to compose\(\) as built objects .* "
                       r"prefixcap.create\(kind, name, options\)"):  # fmt: skip
        system.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SavedSystemError, match="its connector was given"):  # training saves checkpoints: refused first
        prefixcap.train(system, data=SHAPES, run_dir=tmp_path / "run", overrides=NO_EVAL, report=lambda e: None, **QUICK)
    assert not (tmp_path / "run").exists()


def test_train_trains_a_system_composed_in_python_in_place_and_saves_it(tmp_path):
    torch.manual_seed(0)
    system = prefixcap.compose(encoder={"name": "siglip", "checkpoint": "tiny"},
                               connector={"name": "mlp", "hidden": 32, "dropout": 0.0}, decoder=TINY["decoder"])
    before = {n: p.detach().clone() for n, p in system.named_parameters() if p.requires_grad}
    events = []
    result = prefixcap.train(system, data=SHAPES, run_dir=tmp_path / "run", overrides=NO_EVAL, report=events.append,
                             **QUICK)  # fmt: skip
    assert result.system is system and result.steps == 4 and not system.training
    assert any(not torch.equal(before[n], p) for n, p in system.named_parameters() if n in before)
    assert any(type(e).__name__ == "Stepped" for e in events)
    assert "test_loss" in result.metrics
    # The run recorded what it trained on, and final/ is the object given, trained.
    recipe = json.loads((result.run_dir / "final" / "manifest.json").read_text())["recipe"]
    assert recipe["data"]["name"] == "shapes" and recipe["train"]["steps"] == 4
    loaded = prefixcap.load(result.run_dir)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    assert loaded.caption(images) == system.caption(images)


def test_train_takes_a_recipe_and_refuses_overrides_the_given_system_would_not_get(tmp_path):
    result = prefixcap.train(TINY, data="shapes", run_dir=tmp_path / "run",
                             overrides=[*NO_EVAL, "data.train_size=32", "data.val_size=4", "data.test_size=4"],
                             report=lambda e: None, **QUICK)  # fmt: skip
    assert result.steps == 4 and (result.run_dir / "final" / "manifest.json").is_file()
    with pytest.raises(RunError, match="overrides change the given system's connector"):
        prefixcap.train(result.system, data=SHAPES, run_dir=tmp_path / "other", report=lambda e: None,
                        overrides=["connector.hidden=16"])  # fmt: skip
    with pytest.raises(RunError, match="no data section"):
        prefixcap.train(TINY, run_dir=tmp_path / "none", report=lambda e: None)


# A system plugin whose system owns a trained part of its own (not a recipe slot): a learned gate on the prefix.
GATED_FILES = {
    "pyproject.toml": plugin_pyproject("prefixcap-gated", "0.1.0", "pcap_gated", {"gated": "pcap_gated"}),
    "pcap_gated/__init__.py": """
        from prefixcap import ComponentOptions, hookimpl


        @hookimpl
        def register_systems(register):
            register("gated-prefix", factory="pcap_gated.system:GatedPrefix", options=ComponentOptions,
                     description="The prefix system with a learned gate on its prefix")
    """,
    "pcap_gated/system.py": """
        import torch
        from prefixcap.interfaces import Component
        from prefixcap.systems import PrefixOptions
        from prefixcap.systems.prefix import PrefixSystem


        class Gate(Component):
            group_name = "gate"

            def __init__(self):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(()))


        class GatedPrefix(PrefixSystem):
            def __init__(self, options, **parts):
                super().__init__(PrefixOptions(), **parts)
                self.gate = Gate()

            def prefix(self, pixel_values=None, features=None):
                return super().prefix(pixel_values, features) * self.gate.scale
    """,
}


def test_a_system_plugins_own_trained_part_is_saved_and_loaded_with_it(tmp_path, monkeypatch):
    site = install_distribution(GATED_FILES, tmp_path / "src", tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", "prefixcap-gated")
    reload_registry()
    try:
        torch.manual_seed(0)
        system = prefixcap.compose({**TINY, "system": "gated-prefix"})
        fit_batch(system, IMAGES, CAPTIONS, steps=3)
        assert float(system.gate.scale.detach()) != 1.0  # it trained
        system.save(tmp_path / "saved")
        assert (tmp_path / "saved" / "gate" / "model.safetensors").is_file()
        loaded = prefixcap.load(tmp_path / "saved")
        assert float(loaded.gate.scale.detach()) == float(system.gate.scale.detach())
        batch = system.make_batch(IMAGES, CAPTIONS)
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch).logits, system(batch).logits)
    finally:
        monkeypatch.undo()
        reload_registry()
