"""Files from strangers: checkpoints, caches, model repositories with code in them.

a. No pickle is loaded anywhere in prefixcap/ or plugins/: an AST scan (comments and docstrings do not count,
   import aliases do) for pickle/dill/joblib/marshal/shelve loads, torch.load without weights_only=True,
   torch.jit.load, numpy.load with allow_pickle, pandas.read_pickle, yaml.load without a safe loader, eval and exec.
   The scanner is tested on a snippet holding each of those, so it can fail.
b. A checkpoint with a pickle in it (a pytorch_model.bin whose unpickling would create a marker file) is refused with
   a clear PrefixcapError, or ignored beside the safetensors it came with; the marker is never created. For
   prefixcap.load (a saved system) and for the `checkpoint:` of the decoder and of every encoder.
c. trust_remote_code is off unless a recipe turns it on: a checkpoint whose config.json names its own code (auto_map)
   never runs it by default, and turning it on prints a warning naming the checkpoint.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import prefixcap
from prefixcap import CompositionError, PrefixcapError
from prefixcap.decoders import SmolLMOptions
from prefixcap.decoders.causal_lm import CausalLMDecoder
from prefixcap.encoders import ClipOptions, VitOptions
from prefixcap.encoders.clip import ClipEncoder
from prefixcap.encoders.siglip import SiglipEncoder
from prefixcap.encoders.vit import VitEncoder
from prefixcap.errors import SavedSystemError

from conftest import update_json

REPO = Path(__file__).resolve().parents[2]

# --- a. the scanner -------------------------------------------------------------------------------------------------

ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "cPickle.Unpickler", "joblib.load", "pandas.read_pickle", "shelve.open",
    "marshal.load", "marshal.loads", "torch.jit.load", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
    "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader", "yaml.CLoader", "yaml.CUnsafeLoader",
    "yaml.CFullLoader", "eval", "exec",
}  # fmt: skip
UNSAFE_MODULES = {"dill", "cloudpickle"}  # any use at all
CHECKED = {"torch.load", "torch.serialization.load", "numpy.load", "yaml.load", "yaml.load_all"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


class PickleScanner(ast.NodeVisitor):
    """Finds code that can unpickle (or eval) data; import aliases and simple assignments are followed."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.problems: list[tuple[int, str]] = []

    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def flag(self, node: ast.AST, what: str) -> None:
        self.problems.append((node.lineno, what))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.asname:
                self.aliases[a.asname] = a.name
            else:
                self.aliases[a.name.split(".")[0]] = a.name.split(".")[0]
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self.flag(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for a in node.names:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in UNSAFE_MODULES:
                self.flag(node, f"from {node.module} import")

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        name = self.resolve(node.value)
        if name and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            self.aliases[node.targets[0].id] = name  # load = torch.load; load(path)

    def unsafe(self, name: str | None) -> bool:
        return bool(name) and (name in ALWAYS_UNSAFE or name.split(".")[0] in UNSAFE_MODULES)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.resolve(node.func)
        if name in CHECKED:
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name in ("torch.load", "torch.serialization.load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    self.flag(node, f"{name} without weights_only=True")
            elif name == "numpy.load":
                allow = keywords.get("allow_pickle", node.args[2] if len(node.args) > 2 else None)
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    self.flag(node, "numpy.load with allow_pickle")
            else:
                loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if loader is None or self.resolve(loader) not in SAFE_YAML_LOADERS:
                    self.flag(node, f"{name} without a safe Loader")
            for child in [*node.args, *node.keywords]:
                self.visit(child)
            if not isinstance(node.func, ast.Name):
                self.visit(node.func.value)
            return
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and self.unsafe(self.resolve(node)):
            self.flag(node, self.resolve(node))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = self.resolve(node)
        if isinstance(node.ctx, ast.Load) and (self.unsafe(name) or name in CHECKED):
            self.flag(node, f"{name}" + (" passed around (its arguments cannot be checked)" if name in CHECKED else ""))
            return
        self.generic_visit(node)


def scan(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    scanner = PickleScanner()
    scanner.visit(ast.parse(source, filename))
    return sorted(set(scanner.problems))


BAD = '''
import pickle, joblib, marshal, shelve
import pickle as pk
import dill  # bad
from pickle import loads as undo
from dill import loads as dill_loads  # bad
import _pickle
import torch
import torch as T
from torch import load as tload
import numpy as np
from numpy import load as npload
import pandas as pd
from pandas import read_pickle
import yaml
from yaml import load as yload, unsafe_load
pickle.load(f)  # bad
pk.loads(b)  # bad
undo(b)  # bad
_pickle.loads(b)  # bad
pickle.Unpickler(f).load()  # bad
dill_loads(b)  # bad
joblib.load(path)  # bad
marshal.loads(b)  # bad
shelve.open(path)  # bad
torch.load(path)  # bad
T.load(path, weights_only=False)  # bad
tload(path, map_location="cpu")  # bad
torch.load(path, weights_only=flag)  # bad
torch.jit.load(path)  # bad
torch.serialization.load(path)  # bad
np.load(path, allow_pickle=True)  # bad
npload(path, None, True)  # bad
pd.read_pickle(path)  # bad
read_pickle(path)  # bad
yaml.load(text)  # bad
yload(text, Loader=yaml.Loader)  # bad
yaml.load(text, yaml.UnsafeLoader)  # bad
unsafe_load(text)  # bad
yaml.full_load(text)  # bad
eval(text)  # bad
exec(code)  # bad
callback = pickle.loads  # bad
run(torch.load)  # bad
alias = torch.load  # bad (passed around)
alias(path)  # bad
'''
GOOD = '''
"""A docstring may say pickle.load(f) and torch.load(path): it is not code."""
import pickle
import numpy as np
import torch
import yaml
# pickle.load(f)  -- a comment is not code either
torch.load(path, weights_only=True)
torch.load(path, map_location="cpu", weights_only=True)
np.load(path)
np.load(path, allow_pickle=False)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.SafeLoader(text).get_single_node()
model.eval()
text = "pickle.loads(b)"
data = pickle.dumps(obj)  # writing is not reading
try:
    pass
except pickle.UnpicklingError:
    pass
'''


def test_the_scanner_finds_every_kind_of_pickle_load_and_nothing_else():
    found = scan(BAD)
    bad_lines = {i for i, line in enumerate(BAD.splitlines(), 1) if "# bad" in line}
    assert {line for line, _ in found} == bad_lines, found
    assert scan(GOOD) == []


def source_files() -> list[Path]:
    files = sorted(p for d in ("prefixcap", "plugins") for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)
    assert len(files) > 40 and REPO / "prefixcap" / "persist.py" in files
    return files


def test_no_pickle_load_anywhere_in_prefixcap_or_its_plugins():
    problems = [f"{path.relative_to(REPO)}:{line}: {what}" for path in source_files()
                for line, what in scan(path.read_text(encoding="utf-8"), str(path))]  # fmt: skip
    assert problems == []
    counts = os.environ.get("PREFIXCAP_RELIABILITY_COUNTS")
    if counts:
        update_json(Path(counts), "untrusted", {"python_files_scanned": len(source_files())})


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


# --- b. pickles in checkpoints ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): the file appearing means code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> tuple[bytes, Path]:
    """A torch.save file that runs code when unpickled, and the marker it would create; checked to be live."""
    tmp = tmp_path_factory.mktemp("payload")
    marker = tmp / "marker"
    path = tmp / "pytorch_model.bin"
    torch.save({"weight": Payload(marker)}, path)
    # live: an unguarded unpickling (never done by prefixcap) does run it, in a throwaway interpreter
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    assert marker.exists()
    marker.unlink()
    return path.read_bytes(), marker


def plant(payload, directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(payload[0])


def assert_refused(payload, make, *expected: str) -> PrefixcapError:
    with pytest.raises(PrefixcapError) as e:
        make()
    message = str(e.value)
    for text in expected:
        assert text in message, message
    assert "\n" not in message and "\x1b" not in message, message  # one plain line (torch's own error has ANSI codes)
    assert not payload[1].exists(), "the pickle ran"
    return e.value


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained (model.safetensors, config.json, tokenizer), as the hub holds one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("decoder")
    CausalLMDecoder.write_tiny_checkpoint(path, SmolLMOptions(checkpoint="tiny"))
    return path


def copy_of(directory: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(directory, tmp_path / name))


def test_decoder_checkpoint_with_only_a_pickle_is_refused(payload, decoder_dir, tmp_path):
    ckpt = copy_of(decoder_dir, tmp_path, "pickle-only")
    (ckpt / "model.safetensors").unlink()
    plant(payload, ckpt, "pytorch_model.bin")
    error = assert_refused(payload, lambda: prefixcap.create("decoder", "smollm", {"checkpoint": str(ckpt)}),
                           f"{ckpt}: holds pickle-based weights (pytorch_model.bin); prefixcap reads weights from "
                           ".safetensors files only")  # fmt: skip
    assert isinstance(error, CompositionError)


def test_decoder_checkpoint_with_a_pickle_beside_its_safetensors_reads_the_safetensors(payload, decoder_dir, tmp_path):
    ckpt = copy_of(decoder_dir, tmp_path, "pickle-beside")
    plant(payload, ckpt, "pytorch_model.bin", "training_args.bin")
    decoder = prefixcap.create("decoder", "smollm", {"checkpoint": str(ckpt), "finetune": "frozen"})
    saved = load_file(str(ckpt / "model.safetensors"))
    state = decoder.model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert not payload[1].exists()


def test_encoder_checkpoints_with_pickles_are_refused(payload, tmp_path):
    torch.manual_seed(0)
    siglip = tmp_path / "siglip"
    SiglipEncoder.write_tiny_checkpoint(siglip)
    (siglip / "model.safetensors").rename(tmp_path / "siglip.safetensors")
    plant(payload, siglip, "pytorch_model.bin")
    assert_refused(payload, lambda: prefixcap.create("encoder", "siglip", {"checkpoint": str(siglip)}),
                   "holds pickle-based weights (pytorch_model.bin)")  # fmt: skip
    (tmp_path / "siglip.safetensors").rename(siglip / "model.safetensors")  # beside safetensors: not read
    assert prefixcap.create("encoder", "siglip", {"checkpoint": str(siglip)}).dim == 64

    vit = tmp_path / "vit"
    VitEncoder.write_tiny_checkpoint(vit, VitOptions())
    plant(payload, vit, "pytorch_model.bin")  # timm would read it before model.safetensors? either way: refused
    assert_refused(payload, lambda: prefixcap.create("encoder", "vit", {"checkpoint": str(vit)}),
                   f"{vit}: holds pickle-based weights (pytorch_model.bin)")  # fmt: skip
    plant(payload, tmp_path, "vit-weights.pth")
    weights = str(tmp_path / "vit-weights.pth")
    assert_refused(payload, lambda: prefixcap.create("encoder", "vit", {"checkpoint": weights}),
                   "reads weights from .safetensors files only")

    clip = tmp_path / "clip"
    ClipEncoder.write_tiny_checkpoint(clip, ClipOptions())
    plant(payload, clip, "open_clip_pytorch_model.bin")  # open_clip prefers it to a model.safetensors
    assert_refused(payload, lambda: prefixcap.create("encoder", "clip", {"checkpoint": str(clip)}),
                   "holds pickle-based weights (open_clip_pytorch_model.bin)")  # fmt: skip
    plant(payload, tmp_path, "clip-weights.bin")
    weights = str(tmp_path / "clip-weights.bin")
    assert_refused(payload, lambda: prefixcap.create("encoder", "clip", {"checkpoint": weights}),
                   "reads weights from .safetensors files only")
    # the clip-align loss reads its text tower through the same loader
    assert_refused(payload, lambda: prefixcap.create("loss", "clip-align", {"checkpoint": str(clip)}, hidden_size=64),
                   "holds pickle-based weights")  # fmt: skip


@pytest.fixture(scope="module")
def saved_system(decoder_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A trained-looking system saved with system.save: tiny SigLIP, linear connector, LoRA on the local decoder."""
    torch.manual_seed(0)
    recipe = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
              "decoder": {"name": "smollm", "checkpoint": str(decoder_dir), "finetune": "lora"}}  # fmt: skip
    system = prefixcap.compose(recipe)
    path = system.save(tmp_path_factory.mktemp("saved") / "system")
    assert (path / "decoder" / "adapter_model.safetensors").exists()
    assert (path / "connector" / "model.safetensors").exists()
    return path, {k: v.clone() for k, v in system.connector.state_dict().items()}


def test_a_saved_system_reads_only_its_safetensors_and_json(payload, saved_system, tmp_path):
    path = copy_of(saved_system[0], tmp_path, "with-pickles")
    for part in ("connector", "decoder", "encoder"):
        (path / part).mkdir(exist_ok=True)
        plant(payload, path / part, "pytorch_model.bin", "adapter_model.bin", "model.pt")
    system = prefixcap.load(path)
    assert all(torch.equal(system.connector.state_dict()[k], v) for k, v in saved_system[1].items())
    assert not payload[1].exists()


@pytest.mark.parametrize("replaced", ["connector/model.safetensors", "decoder/adapter_model.safetensors",
                                      "encoder/model.safetensors", "manifest.json",
                                      "manifest.json (binary)"])  # fmt: skip
def test_a_saved_system_whose_file_is_a_pickle_is_refused(payload, saved_system, tmp_path, replaced):
    path = copy_of(saved_system[0], tmp_path, "replaced")
    (path / replaced).parent.mkdir(exist_ok=True)
    if replaced == "manifest.json":  # a text pickle (protocol 0 is ASCII), so the JSON reader is what refuses it
        (path / replaced).write_bytes(pickle.dumps(Payload(payload[1]), protocol=0))
    elif replaced == "manifest.json (binary)":
        replaced = "manifest.json"
        (path / replaced).write_bytes(pickle.dumps(Payload(payload[1])))  # not UTF-8 at all
    else:
        plant(payload, path / Path(replaced).parent, Path(replaced).name)
    expected = "unreadable manifest" if replaced == "manifest.json" else "unreadable safetensors file"
    error = assert_refused(payload, lambda: prefixcap.load(path), f"{path / replaced}: {expected}")
    assert isinstance(error, SavedSystemError)


# --- c. code shipped with a checkpoint ----------------------------------------------------------------------------

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


def test_the_crossattn_baseline_refuses_pickle_only_checkpoints(payload, tmp_path):
    from transformers import AutoConfig, GPT2Config

    from prefixcap.systems.crossattn import TINY_VIT

    vit = tmp_path / "vit"
    AutoConfig.for_model(**TINY_VIT).save_pretrained(vit)
    plant(payload, vit, "pytorch_model.bin")
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    plant(payload, gpt2, "pytorch_model.bin")
    for encoder, decoder in ((str(vit), "tiny"), ("tiny", str(gpt2))):
        assert_refused(payload, lambda: prefixcap.compose({"system": {"name": "crossattn", "encoder": encoder,
                                                                      "decoder": decoder}}))  # fmt: skip


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
