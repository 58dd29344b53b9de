"""Data parallelism under `torchrun` or `accelerate launch`: train.batch_size stays the global batch, each process
takes its own slice of every micro-batch, and only the main process writes the run directory."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun and `accelerate launch`


def on_cpu() -> bool:
    """accelerate joins the processes of a launch through an accelerator (GPU) unless told to use the CPU; without
    this, `torchrun` on a machine without one would start independent runs that overwrite each other's files."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    if launched_processes() == 1:
        return False  # accelerate picks the device, as for any single process
    return not (torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available())


def global_token_mean(accelerator, loss: Tensor, labels: Tensor) -> tuple[Tensor, float]:
    """(this process's loss rescaled for DDP, the loss of the whole micro-batch) from this process's loss.

    The caption loss is a mean over this slice's caption tokens and DDP averages gradients over processes; when the
    slices hold different numbers of tokens, the mean of their means is not the token mean of the whole micro-batch
    that one process would take the gradient of. Weighting each slice by its share of the tokens (times the number
    of processes, which DDP divides by again) makes the two gradients equal. Losses that are means over examples
    (clip-align) get the same weights, which average to 1 over the processes. The batch loss is the same number on
    every process, so a non-finite loss on one of them stops them all."""
    processes = accelerator.num_processes
    if processes == 1:
        return loss, float(loss.detach())
    tokens = (labels != -100).sum().float()
    total_tokens, total_loss = accelerator.reduce(torch.stack([tokens, loss.detach().float() * tokens]), "sum")
    return loss * (tokens * processes / total_tokens), float(total_loss / total_tokens)


def reduce_max(accelerator, value: float | int) -> float:
    """The largest of the processes' values (a clock, a received signal), so that all of them act alike."""
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor(value, device=accelerator.device), "max"))
