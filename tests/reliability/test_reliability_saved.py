"""Saved systems and ONNX exports that are damaged or hostile, and exports onto a full disk (issue 20).

a. Weights that are not what a model can run on (integers where it has floats, NaN, inf) are refused, naming the
   file and the tensor, instead of captioning empty strings.
b. A saved system whose trained weights are missing (deleted, not listed, listed as a pickle, or a file short of
   tensors) is refused: random weights are never served as a model.
c. A manifest nested too deep to parse (saved system or ONNX export) is a clear error, not a RecursionError.
d. An ONNX export with a truncated graph, a graph outside its directory or a manifest missing a section is refused
   with the file named.
e. `prefixcap export` onto a full disk stops with a clear error and leaves no partial graph behind.
Every saved system here is a copy of the session's quickstart (conftest.quickstart_short), tampered with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import prefixcap
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.errors import SavedSystemError
from prefixcap.onnx_captioner import ExportError, OnnxCaptioner

from conftest import run_cli
from test_reliability_training import confined
from untrusted_files import copy_of

DEEP = 100_000  # levels of nesting: far past Python's recursion limit


@pytest.fixture(scope="module")
def saved(quickstart_short) -> Path:
    return quickstart_short.run_dir / "final"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "shapes.png"
    ShapesSource(ShapesOptions()).example("test", 0).image.save(path)
    return path


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory) -> Path:
    """The quickstart exported to ONNX (fp32 graphs only)."""
    from prefixcap.export import export_system

    out = tmp_path_factory.mktemp("export") / "onnx"
    export_system(saved, out)
    return out


def refused(done: subprocess.CompletedProcess, *expected: str) -> str:
    """The CLI stopped with exit code 2 and an `error:` line holding each of ``expected``, without a traceback."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    line = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "")
    assert all(text in line for text in expected), done.stderr
    return line


def rewrite_tensor(path: Path, change) -> str:
    """Replace the first tensor of the safetensors file ``path`` by ``change(tensor)``; returns its name."""
    state = load_file(path)
    name = sorted(state)[0]
    state[name] = change(state[name])
    save_file(state, path, metadata={"format": "pt"})
    return name


def edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --- a. weights of the wrong kind -------------------------------------------------------------------------------------


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("-inf")
    return t


def test_integer_weights_are_refused_naming_the_file_and_tensor(saved, image, tmp_path):
    path = copy_of(saved, tmp_path, "int64")
    name = rewrite_tensor(path / "connector" / "model.safetensors", lambda t: t.round().to(torch.int64))
    refused(run_cli("caption", str(path), str(image)), str(path / "connector" / "model.safetensors"), name, "int64")


@pytest.mark.parametrize("part,change", [("connector", with_nan), ("decoder", with_inf)])
def test_weights_that_are_not_finite_are_refused_naming_the_file_and_tensor(saved, tmp_path, part, change):
    path = copy_of(saved, tmp_path, part)
    name = rewrite_tensor(path / part / "model.safetensors", change)
    with pytest.raises(SavedSystemError, match="not finite") as error:
        prefixcap.load(path)
    assert str(path / part / "model.safetensors") in str(error.value) and name in str(error.value)


# --- b. trained weights that are missing ------------------------------------------------------------------------------


def test_a_system_whose_weights_were_deleted_and_unlisted_is_refused(saved, image, tmp_path):
    path = copy_of(saved, tmp_path, "deleted")
    for part in ("connector", "decoder"):
        (path / part / "model.safetensors").unlink()
    edit_manifest(path, lambda m: m.update(files={}))
    refused(run_cli("caption", str(path), str(image)), str(path), "connector", "no weights")


def test_a_manifest_naming_pickle_weights_is_refused(saved, image, tmp_path):
    path = copy_of(saved, tmp_path, "pickle")
    (path / "connector" / "model.safetensors").rename(path / "connector" / "pytorch_model.bin")
    edit_manifest(path, lambda m: m["files"].update(connector=["pytorch_model.bin"]))
    refused(run_cli("caption", str(path), str(image)), "connector/pytorch_model.bin", "safetensors")


def test_a_weights_file_short_of_tensors_is_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path, "short")
    weights = path / "decoder" / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(state)[-1]
    save_file({k: v for k, v in state.items() if k != dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(SavedSystemError, match="missing") as error:
        prefixcap.load(path)
    assert str(weights) in str(error.value) and dropped in str(error.value)


# --- c. manifests nested too deep -------------------------------------------------------------------------------------


def deep_manifest(fmt: str, depth: int) -> str:
    return '{"format": "%s", "recipe": %s%s}' % (fmt, "[" * depth, "]" * depth)


@pytest.mark.parametrize("depth", [DEEP, 900])  # 900: parses, but deeper than any recipe (and than a recursive walk)
def test_a_saved_system_manifest_nested_too_deep_is_refused(saved, tmp_path, depth):
    path = copy_of(saved, tmp_path, "deep")
    (path / "manifest.json").write_text(deep_manifest("prefixcap-system/1", depth))
    with pytest.raises(SavedSystemError, match="nested"):
        prefixcap.load(path)


def test_a_deep_manifest_is_refused_by_the_cli_for_systems_and_exports(saved, exported, image, tmp_path):
    path = copy_of(saved, tmp_path, "deep")
    (path / "manifest.json").write_text(deep_manifest("prefixcap-system/1", DEEP))
    refused(run_cli("caption", str(path), str(image)), str(path / "manifest.json"), "nested")
    onnx = copy_of(exported, tmp_path, "deep-onnx")
    (onnx / "manifest.json").write_text(deep_manifest("prefixcap-onnx/2", DEEP))
    refused(run_cli("caption", "--onnx", str(onnx), str(image)), str(onnx / "manifest.json"), "nested")


# --- d. hostile ONNX exports ------------------------------------------------------------------------------------------


def test_an_export_with_a_truncated_graph_is_refused_naming_it(exported, image, tmp_path):
    onnx = copy_of(exported, tmp_path, "truncated")
    graph = onnx / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    refused(run_cli("caption", "--onnx", str(onnx), str(image)), str(graph))


def test_an_export_missing_a_manifest_section_is_refused(exported, image, tmp_path):
    onnx = copy_of(exported, tmp_path, "no-tokens")
    edit_manifest(onnx, lambda m: m.pop("tokens"))
    refused(run_cli("caption", "--onnx", str(onnx), str(image)), str(onnx / "manifest.json"), "tokens")
    for section, broken in (("graphs", {"decoder": {"file": "decoder.onnx"}}), ("image", {"size": "big"})):
        copy = copy_of(exported, tmp_path, f"no-{section}")
        edit_manifest(copy, lambda m: m.update({section: broken}))
        with pytest.raises(ExportError, match=section):
            OnnxCaptioner(copy)


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink", "tokenizer"])
def test_an_export_reaching_outside_its_directory_is_refused(exported, tmp_path, escape):
    onnx = copy_of(exported, tmp_path, "export")
    outside = tmp_path / "outside"
    outside.mkdir()
    (onnx / "connector.onnx").rename(outside / "connector.onnx")
    if escape == "parent":
        edit_manifest(onnx, lambda m: m["graphs"]["connector"].update(file="../outside/connector.onnx"))
    elif escape == "absolute":
        edit_manifest(onnx, lambda m: m["graphs"]["connector"].update(file=str(outside / "connector.onnx")))
    elif escape == "symlink":
        (onnx / "connector.onnx").symlink_to(outside / "connector.onnx")
    else:
        (outside / "connector.onnx").rename(onnx / "connector.onnx")
        (onnx / "tokenizer.json").rename(outside / "tokenizer.json")
        edit_manifest(onnx, lambda m: m["tokens"].update(tokenizer="../outside/tokenizer.json"))
    with pytest.raises(ExportError, match="outside the export directory"):
        OnnxCaptioner(onnx)


# --- e. exporting onto a full disk ------------------------------------------------------------------------------------


def test_an_export_onto_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(saved, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "onnx"
    prefixcap_exe = str(Path(sys.executable).with_name("prefixcap"))
    script = f"""
        import os, subprocess
        with filled_disk({str(disk / "filler")!r}) as f:
            f.truncate(f.tell() - 256_000)  # room for part of a graph, not for all of them
            done = subprocess.run([{prefixcap_exe!r}, "export", {str(saved)!r}, "--out", {str(out)!r}],
                                  capture_output=True, text=True, timeout=240)
        print("code:", done.returncode)
        print(done.stderr)
        print("left:", sorted(p.name for p in os.scandir({str(disk)!r}) if p.name != "filler"),
              sorted(os.listdir({str(out)!r})) if os.path.isdir({str(out)!r}) else None)
    """
    done = confined(script, "tmpfs", disk, {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "filled: No space left on device" in lines and "Traceback" not in done.stdout, done.stdout
    assert "code: 2" in lines, done.stdout
    error = next(line for line in lines if line.startswith("error:"))
    assert str(out) in error and "No space left on device" in error
    assert lines[-1] in ("left: [] None", "left: ['onnx'] []"), done.stdout
