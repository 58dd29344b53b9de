"""Files from strangers: checkpoints, caches, model repositories with code in them.

a. No pickle is loaded anywhere in prefixcap/ or plugins/: an AST scan (comments and docstrings do not count,
   import aliases do) for pickle/dill/joblib/marshal/shelve loads, torch.load without weights_only=True,
   torch.jit.load, numpy.load with allow_pickle, pandas.read_pickle, yaml.load without a safe loader, eval and exec.
   The scanner is tested on a snippet holding each of those, so it can fail.
b. A checkpoint with a pickle in it (a pytorch_model.bin whose unpickling would create a marker file) is refused with
   a clear PrefixcapError, or ignored beside the safetensors it came with; the marker is never created. For
   prefixcap.load (a saved system) and for the `checkpoint:` of the decoder and of every encoder.
Code shipped with a checkpoint (trust_remote_code) is test_reliability_remote_code.py's.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefixcap
from prefixcap import CompositionError, PrefixcapError
from prefixcap.encoders import ClipOptions, VitOptions
from prefixcap.encoders.clip import ClipEncoder
from prefixcap.encoders.siglip import SiglipEncoder
from prefixcap.encoders.vit import VitEncoder
from prefixcap.errors import SavedSystemError

from conftest import update_json
from untrusted_files import REPO, copy_of, source_files, write_decoder_checkpoint

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



def test_no_pickle_load_anywhere_in_prefixcap_or_its_plugins():
    problems = [f"{path.relative_to(REPO)}:{line}: {what}" for path in source_files()
                for line, what in scan(path.read_text(encoding="utf-8"), str(path))]  # fmt: skip
    assert problems == []
    counts = os.environ.get("PREFIXCAP_RELIABILITY_COUNTS")
    if counts:
        update_json(Path(counts), "untrusted", {"python_files_scanned": len(source_files())})


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
    return write_decoder_checkpoint(tmp_path_factory.mktemp("decoder"))


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
