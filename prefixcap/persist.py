"""Saving and loading systems: what was trained as safetensors, plus a manifest.json a human can read.

    run/final/
      manifest.json            format, versions, the fully resolved recipe, base checkpoints and their revisions
      connector/model.safetensors
      decoder/adapter_config.json + adapter_model.safetensors     (LoRA: loads with plain peft)
      encoder/...              only if it trained something or was randomly initialised

``load(directory)`` rebuilds the system through compose() from the manifest's recipe (base weights come from their
checkpoints, as when it was first built) and loads the trained tensors on top. Only safetensors and JSON are read:
no pickle, so a checkpoint from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefixcap import checkpoints
from prefixcap.errors import PrefixcapError

FORMAT = "prefixcap-system/1"


class CheckpointError(PrefixcapError):
    """A saved system is missing, incomplete or does not match what its manifest describes."""


def module_state(module: nn.Module, everything: bool = False) -> dict[str, Tensor]:
    """Trainable parameters of ``module`` (or its whole state), with tied tensors stored once."""
    named = module.state_dict(keep_vars=True)
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in named.items():
        if not everything and not (isinstance(tensor, nn.Parameter) and tensor.requires_grad):
            continue
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:  # e.g. lm_head tied to embed_tokens: safetensors refuses shared storage
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_tensors(state: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def load_into(module: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``module``: every saved tensor must land on a parameter of the same shape."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"{path}: tensors {unknown[:5]} do not exist in this {type(module).__name__}")
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(
            f"{path}: shape mismatch for {wrong[0]}: saved {tuple(state[wrong[0]].shape)}, "
            f"model has {tuple(own[wrong[0]].shape)}"
        )
    module.load_state_dict(state, strict=False)


def _versions() -> dict[str, str]:
    return checkpoints.installed_versions(
        ("prefixcap", "torch", "transformers", "peft", "timm", "open_clip_torch", "safetensors"))


def _components(system: Any) -> dict[str, Any]:
    from prefixcap.registry import get_component

    out = {}
    for loc, kind, spec in system.recipe.components():
        provider = get_component(kind, spec.name).provider
        slot = ".".join(map(str, loc))
        part = dict(system.parts()).get(slot)
        revision = getattr(getattr(part, "config", None), "_commit_hash", None)  # set by from_pretrained from the hub
        out[slot] = {"kind": kind, "name": spec.name, "distribution": provider.dist, "version": provider.version,
                     "checkpoint": getattr(spec.options, "checkpoint", None), "revision": revision}  # fmt: skip
    return out


def save_system(system: Any, directory: Path) -> Path:
    """Write into a temporary sibling directory, then swap it in: a crash never leaves a half-written checkpoint
    where a complete one was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(directory)
    try:
        tmp.mkdir()
        files: dict[str, list[str]] = {}
        for slot, part in system.parts():
            written = part.save_trained(tmp / slot)
            if written:
                files[slot] = written
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "system": system.recipe.system.name,
            "versions": _versions(),
            "components": _components(system),
            "files": files,
            "recipe": system.recipe.to_dict(resolved=True),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves nothing behind but the previous save
        raise
    return publish_dir(tmp, directory)


# --- writes that are all or nothing ------------------------------------------------------------------------------
# A run can die at any instruction (SIGKILL, the OOM killer, a full disk). Everything it leaves is written beside
# its final name, flushed to disk, then renamed over it: a reader sees the old version or the new one, never a mix.
# Leftover temporaries start with "." and end in ".tmp-<pid>" or ".old-<pid>", so a later run can sweep them.


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    tmp = path.parent / f".{path.name}.{kind}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a power cut (the file's own fsync does not cover its name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journalled by NTFS
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, directory: Path) -> Path:
    """Flush the complete directory ``tmp`` to disk and put it where ``directory`` was (replacing it)."""
    _fsync_tree(tmp)
    old = temporary_sibling(directory, "old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def write_atomic(path: Path, text: str) -> None:
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_temporaries(directory: Path) -> list[Path]:
    """Remove what writes interrupted in ``directory`` (and one level down) left behind; returns what it removed."""
    found = [p for pattern in (".*.tmp-*", ".*.old-*", "*/.*.tmp-*", "*/.*.old-*") for p in directory.glob(pattern)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def _remote_code_settings(recipe: Any, path: str = "") -> list[str]:
    """Where a recipe (as saved in a manifest) sets trust_remote_code true, as dotted paths."""
    if isinstance(recipe, dict):
        found = [path + "trust_remote_code"] if recipe.get("trust_remote_code") is True else []
        return found + [p for k, v in recipe.items() for p in _remote_code_settings(v, f"{path}{k}.")]
    if isinstance(recipe, list):
        return [p for i, v in enumerate(recipe) for p in _remote_code_settings(v, f"{path}{i}.")]
    return []


def read_manifest(directory: Path) -> dict[str, Any]:
    return checkpoints.read_manifest(directory, FORMAT, CheckpointError, "a saved prefixcap system")


def load_system(directory: str | Path, device: str | torch.device | None = None, *,
                trust_remote_code: bool = False) -> Any:  # fmt: skip
    """Rebuild a saved system: compose from the manifest's recipe, then load the trained tensors."""
    from prefixcap.compose import compose

    directory = Path(directory)
    manifest = read_manifest(directory)
    remote = _remote_code_settings(manifest.get("recipe"))
    if remote and not trust_remote_code:  # the manifest is a stranger's file: it may not switch code execution on
        raise CheckpointError(f"{directory}: its recipe sets trust_remote_code ({', '.join(remote)}), which would run "
                              "code from the checkpoints it names; load it with prefixcap.load(..., "
                              "trust_remote_code=True) only if you trust them")  # fmt: skip
    for slot, names in manifest.get("files", {}).items():
        for name in names:
            if not (directory / slot / name).is_file():
                raise CheckpointError(f"{directory}: {slot}/{name} listed in the manifest is missing")
    system = compose(manifest["recipe"])
    system.load_trained(directory)
    if device is not None:
        system.to(device)
    return system.eval()
