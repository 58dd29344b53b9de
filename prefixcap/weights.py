"""A component's trained tensors in and out, as safetensors only.

``module_state`` picks what a component trained (or, for one built from random initialisation, all of it);
``save_tensors`` writes it, ``load_into`` reads it back onto a built component and checks that the file holds every
tensor the component trained, each landing on a parameter of the same shape and kind (float or integer), with finite
values. ``save_transformers`` writes a transformers model as the folder its ``from_pretrained`` reads, and
``transformers_names`` says what each tensor is called there, for ``load_into`` to read it back.
``refuse_pickle_weights`` stops a component from reading base weights a pickle could hide code in: loading a
pickle-based file can run whatever it names, so prefixcap reads none.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefixcap.errors import CompositionError, SavedSystemError

# Weights files in pickle formats: loading one runs whatever code it names (torch's weights_only unpickler refuses
# most of it, as an UnpicklingError, but prefixcap reads no pickle at all from a checkpoint).
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")


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


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, refused if any floating one holds NaN or inf: a model with such a weight
    computes NaN logits, which greedy decoding turns into empty captions rather than an error."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise SavedSystemError(f"{path}: unreadable safetensors file: {e}") from e
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SavedSystemError(f"{path}: tensor {name} is not finite (it holds NaN or inf); the file is damaged")
    return state


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    return "complex" if dtype.is_complex else "bool" if dtype == torch.bool else "integer"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def trained_names(module: nn.Module) -> set[str]:
    """The tensors a saved ``module`` must provide: what it trains (a Component's trained_state, which for one built
    from random initialisation is all of it). Empty for a part that trains nothing, which saves no file."""
    trained = getattr(module, "trained_state", None)
    return set(trained() if callable(trained) else module_state(module))


def load_into(module: nn.Module, path: Path, names: dict[str, str] | None = None,
              expected: Iterable[str] | None = None) -> None:  # fmt: skip
    """Load a safetensors file into ``module``: every saved tensor must land on a parameter of the same shape and
    kind, and every tensor the module trains must be there (strict loading would also ask for frozen base weights,
    which the file rightly leaves out). ``names``: the file's name for each of the module's tensors, where the file
    names them its own way (a transformers checkpoint inside a component); errors then use the file's names.
    ``expected``: the module's tensors the file must hold, if not what the module trains."""
    state = read_tensors(path)
    everything = module.state_dict()
    names = names if names is not None else {name: name for name in everything}
    own = {names[k]: v for k, v in everything.items() if k in names}
    cls = type(module).__name__
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise SavedSystemError(f"{path}: tensors {unknown[:5]} do not exist in this {cls}")
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise SavedSystemError(
            f"{path}: shape mismatch for {wrong[0]}: saved {tuple(state[wrong[0]].shape)}, "
            f"model has {tuple(own[wrong[0]].shape)}"
        )
    # load_state_dict converts silently: int64 weights would load as whole numbers and caption nonsense
    foreign = [k for k, v in state.items() if _kind(v.dtype) != _kind(own[k].dtype)]
    if foreign:
        name = foreign[0]
        raise SavedSystemError(f"{path}: tensor {name} holds {_dtype_name(state[name].dtype)} values where this {cls} "
                               f"has {_dtype_name(own[name].dtype)} ones")  # fmt: skip
    needed = {names[k] for k in (trained_names(module) if expected is None else expected) if k in names}
    missing = sorted(needed - set(state))
    if missing:  # they would keep their random initialisation
        raise SavedSystemError(f"{path}: tensors {missing[:5]} are missing ({len(missing)} of the {len(needed)} "
                               f"this {cls} {'trains' if expected is None else 'needs'})")  # fmt: skip
    inside = {file: name for name, file in names.items()}
    module.load_state_dict({inside[k]: v for k, v in state.items()}, strict=False)


def transformers_names(model: nn.Module, state: dict[str, Tensor]) -> dict[str, str]:
    """The name ``model.save_pretrained`` gives each tensor of ``state`` (``model``'s own, by their names in it):
    transformers 5 writes some architectures under the hub's older names (ViT's ``layer.0.attention.attention.query``
    for ``layers.0.attention.q_proj``), and renames them back as it loads them."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 writes every tensor under its own name
        return {name: name for name in state}
    saved = revert_weight_conversion(model, dict(state))
    inside = {id(tensor): name for name, tensor in state.items()}
    names = {inside[id(tensor)]: name for name, tensor in saved.items() if id(tensor) in inside}
    if len(names) != len(state):  # a converter built new tensors (fused experts, say): no name maps to one of ours
        raise SavedSystemError(f"a {type(model).__name__} is saved with some of its tensors converted, not only "
                               "renamed; prefixcap cannot save it in transformers' format")  # fmt: skip
    return names


def save_transformers(model: Any, state: dict[str, Tensor], directory: Path) -> list[str]:
    """``state`` (tensors of the transformers ``model``, by their names in it) as the folder ``from_pretrained``
    reads: config.json, generation_config.json and model.safetensors, what ``save_pretrained`` writes, under the names
    it gives them (``transformers_names``). Written here rather than by save_pretrained, which shows a progress bar at
    every checkpoint of a run and may shard the weights; returns the file names."""
    names = transformers_names(model, state)
    save_tensors({names[k]: v for k, v in state.items()}, directory / "model.safetensors")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")  # from_pretrained loads in this dtype by default
    config.save_pretrained(directory)
    written = ["config.json", "model.safetensors"]
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
        written.append("generation_config.json")
    return written


def read_adapter(path: Path) -> dict[str, Tensor]:
    """A peft adapter's tensors, for peft's own loader (which checks no values): trained LoRA matrices only, so finite
    floats."""
    state = read_tensors(path)
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise SavedSystemError(f"{path}: tensor {name} holds {_dtype_name(tensor.dtype)} values; an adapter's "
                                   "weights are floating point")  # fmt: skip
    return state


def refuse_pickle_weights(checkpoint: str | None, *, beside_safetensors_ok: bool = False) -> None:
    """Weights are read from safetensors files only. A local weights file must be .safetensors; a local directory
    must hold no pickle weights its loader could read: timm and open_clip may prefer a .bin over a .safetensors beside
    it, while transformers told ``use_safetensors=True`` reads none (``beside_safetensors_ok``: refuse only a
    directory with no safetensors weights, to say why it fails). Hub ids and "tiny" pass."""
    if not checkpoint:
        return
    path = Path(checkpoint)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CompositionError(f"{checkpoint}: prefixcap reads weights from .safetensors files only (a "
                                   f"pickle-based file can run code when loaded); convert it with "
                                   f"safetensors.torch.save_file")
        return
    if not path.is_dir():
        return
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    pickled = [f for f in files if f.lower().endswith(PICKLE_WEIGHTS)]
    if not pickled or (beside_safetensors_ok and any(f.endswith((".safetensors", ".safetensors.index.json"))
                                                     for f in files)):  # fmt: skip
        return
    raise CompositionError(f"{checkpoint}: holds pickle-based weights ({', '.join(pickled[:5])}); prefixcap reads "
                           f"weights from .safetensors files only (pickle can run code when loaded): convert them "
                           f"(safetensors.torch.save_file) or remove them")
