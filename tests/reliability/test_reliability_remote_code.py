"""Code shipped with a checkpoint: trust_remote_code is off unless a recipe turns it on, and only a real true turns
it on. A checkpoint whose config.json names its own code (auto_map) never runs it by default; turning it on prints a
warning naming the checkpoint; a saved system's manifest cannot turn it on by itself, whatever value it writes.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from untrusted_files import REPO, copy_of, source_files, write_decoder_checkpoint

import prefixcap
from prefixcap import CompositionError
from prefixcap.encoders.siglip import SiglipEncoder
from prefixcap.errors import SavedSystemError


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return write_decoder_checkpoint(tmp_path_factory.mktemp("decoder"))


def test_trust_remote_code_is_never_a_literal_true_and_only_the_recipe_option_turns_it_on():
    """Every loader says trust_remote_code=False (unset, transformers would ask on a terminal); only the decoder
    passes its recipe option, and prefixcap.load its caller's."""
    variable: dict[str, list] = {}
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for kw in getattr(node, "keywords", []):
                if kw.arg == "trust_remote_code":
                    assert not (isinstance(kw.value, ast.Constant) and kw.value.value is not False), (path, kw.lineno)
                    if not isinstance(kw.value, ast.Constant):
                        variable.setdefault(str(path.relative_to(REPO)), []).append(ast.unparse(kw.value))
    assert set(variable) == {"prefixcap/__init__.py", "prefixcap/decoders/causal_lm.py"}, variable



EVIL_CONFIG = """
import pathlib
pathlib.Path({marker!r}).write_text("configuration_evil ran")
from transformers import LlamaConfig

class EvilConfig(LlamaConfig):
    model_type = "llama"
"""
EVIL_MODEL = """
import pathlib
pathlib.Path({marker!r}).write_text("modeling_evil ran")
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig

class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def with_remote_code(decoder_dir: Path, tmp_path: Path, model_type: str = "llama") -> tuple[Path, Path]:
    """A copy of the decoder checkpoint whose config.json names code of its own (auto_map), which writes a marker."""
    ckpt = copy_of(decoder_dir, tmp_path, f"remote-{model_type}")
    marker = tmp_path / f"remote-code-ran-{model_type}"
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (ckpt / "modeling_evil.py").write_text(EVIL_MODEL.format(marker=str(marker)))
    return ckpt, marker


def test_code_in_a_checkpoint_of_a_known_architecture_is_not_run_by_default(decoder_dir, tmp_path):
    ckpt, marker = with_remote_code(decoder_dir, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder = prefixcap.create("decoder", "smollm", {"checkpoint": str(ckpt), "finetune": "frozen"})
        report = prefixcap.validate({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
                                     "decoder": {"name": "smollm", "checkpoint": str(ckpt)}})  # fmt: skip
    assert type(decoder.model).__name__ == "LlamaForCausalLM" and report.total > 0  # transformers' own class
    assert not marker.exists()
    assert not [w for w in caught if "trust_remote_code" in str(w.message)]


def test_code_in_a_checkpoint_of_an_unknown_architecture_is_refused_without_asking(decoder_dir, tmp_path, monkeypatch):
    """Left unset, transformers' trust_remote_code would ask on the terminal (for 15 s) whether to run the code."""
    ckpt, marker = with_remote_code(decoder_dir, tmp_path, model_type="evil-llama")
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "")
    for weights in ("pretrained", "none"):
        with pytest.raises(CompositionError) as e:
            prefixcap.compose({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
                               "decoder": {"name": "smollm", "checkpoint": str(ckpt)}}, weights=weights)  # fmt: skip
        assert (f"{ckpt}' ships its own model code (auto_map in its config.json), which prefixcap runs only when the "
                "recipe sets trust_remote_code: true on this component") in str(e.value)
    assert asked == [] and not marker.exists()


def test_trust_remote_code_in_a_recipe_warns_naming_the_checkpoint(decoder_dir, tmp_path):
    with pytest.warns(UserWarning, match="trust_remote_code is on: code shipped with 'tiny' will run"):
        prefixcap.compose({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
                           "decoder": {"name": "smollm", "checkpoint": "tiny", "trust_remote_code": True}})
    # and the CLI shows it: `prefixcap validate` of a recipe that turns it on for a checkpoint with code
    ckpt, marker = with_remote_code(decoder_dir, tmp_path)
    recipe = tmp_path / "remote.yaml"
    recipe.write_text(yaml.safe_dump({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
                                      "decoder": {"name": "smollm", "checkpoint": str(ckpt),
                                                  "trust_remote_code": True}}))  # fmt: skip
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "PYTHONWARNINGS": ""}
    done = subprocess.run([str(Path(sys.executable).with_name("prefixcap")), "validate", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"UserWarning: trust_remote_code is on: code shipped with '{ckpt}' will run" in done.stderr
    assert marker.read_text().endswith("_evil ran")  # what the recipe asked for: the checkpoint's code ran


def test_an_encoder_checkpoint_with_code_never_runs_it(tmp_path):
    """The siglip encoder loads with transformers' own classes: a config.json auto_map is ignored."""
    torch.manual_seed(0)
    ckpt = tmp_path / "siglip"
    SiglipEncoder.write_tiny_checkpoint(ckpt)
    marker = tmp_path / "encoder-code-ran"
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (ckpt / name).write_text(textwrap.dedent(f"""
            import pathlib
            pathlib.Path({str(marker)!r}).write_text("ran")
        """))
    encoder = prefixcap.create("encoder", "siglip", {"checkpoint": str(ckpt)})
    assert encoder.dim == 64 and not marker.exists()


def test_a_saved_system_cannot_switch_remote_code_on_by_itself(tmp_path):
    """A saved system rebuilds from its manifest's recipe: a stranger's manifest setting trust_remote_code would run
    the code of the checkpoints it names. prefixcap.load refuses it unless the caller opts in."""
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        system = prefixcap.compose({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
                                    "decoder": {"name": "smollm", "checkpoint": "tiny", "trust_remote_code": True}})
    path = system.save(tmp_path / "system")
    with pytest.raises(SavedSystemError, match=r"sets trust_remote_code \(decoder.trust_remote_code\).*trust_remote_code=True"):
        prefixcap.load(path)
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        loaded = prefixcap.load(path, trust_remote_code=True)
    saved, rebuilt = system.state_dict(), loaded.state_dict()
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy")]
    assert loaded.caption(images, max_new_tokens=8) == system.eval().caption(images, max_new_tokens=8)



@pytest.mark.parametrize("value", ["yes", "true", 1, "false"])
def test_trust_remote_code_is_on_only_for_a_real_true(tmp_path, value):
    """pydantic's lax bool reads "yes", "true" and 1 as True: a manifest or recipe saying so must not switch code
    execution on. A saved system with any value but false is refused (even "false": not a boolean, not trusted),
    and a recipe must give a boolean."""
    system = prefixcap.compose({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
                                "decoder": {"name": "smollm", "checkpoint": "tiny"}})  # fmt: skip
    path = system.save(tmp_path / "system")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["recipe"]["decoder"]["trust_remote_code"] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SavedSystemError, match=r"sets trust_remote_code \(decoder.trust_remote_code\)"):
        prefixcap.load(path)
    with pytest.raises(prefixcap.RecipeError, match="decoder.trust_remote_code: Input should be a valid boolean"):
        prefixcap.load_recipe({"decoder": {"name": "smollm", "checkpoint": "tiny", "trust_remote_code": value}})
