"""AdamW over the system's parameter groups with warm-up and cosine decay, and its state as safetensors + JSON."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from prefixcap.interfaces import ParamGroup, System
from prefixcap.recipe import Recipe
from prefixcap.training.errors import RunError


def make_optimizer(system: System, recipe: Recipe) -> tuple[torch.optim.Optimizer, Any]:
    t = recipe.train
    if recipe.language is not None:  # a language run trains its adapter and nothing else (prefixcap.languages)
        params = system.decoder.language_parameters(recipe.language.name)
        chosen = [ParamGroup("language", params, None)]
    else:
        chosen = system.param_groups()
    groups = [{"params": g.params, "lr": g.lr or t.lr, "name": g.name,
               "weight_decay": t.weight_decay if g.weight_decay is None else g.weight_decay}
              for g in chosen]  # fmt: skip
    if not groups:
        raise RunError("nothing to train: every parameter of this system is frozen")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))

    def warmup_cosine(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """AdamW state as safetensors-ready tensors plus JSON: no pickle, so a checkpoint cannot run code."""
    state = optimizer.state_dict()
    tensors = {f"{idx}.{k}": v.contiguous() for idx, s in state["state"].items() for k, v in s.items()}
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
