"""A component's trained tensors in and out, as safetensors only.

``module_state`` picks what a component trained (or, for one built from random initialisation, all of it);
``save_tensors`` writes it, ``load_into`` reads it back onto a built component and checks every tensor lands on a
parameter of the same shape. ``refuse_pickle_weights`` stops a component from reading base weights a pickle could
hide code in: loading a pickle-based file can run whatever it names, so prefixcap reads none.
"""

from __future__ import annotations

from pathlib import Path

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


def load_into(module: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``module``: every saved tensor must land on a parameter of the same shape."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise SavedSystemError(f"{path}: unreadable safetensors file: {e}") from e
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise SavedSystemError(f"{path}: tensors {unknown[:5]} do not exist in this {type(module).__name__}")
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise SavedSystemError(
            f"{path}: shape mismatch for {wrong[0]}: saved {tuple(state[wrong[0]].shape)}, "
            f"model has {tuple(own[wrong[0]].shape)}"
        )
    module.load_state_dict(state, strict=False)


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
