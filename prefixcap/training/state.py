"""A run's checkpoints/step-N: the trained system, AdamW's state, the torch RNG and the trainer's own state, written
completely or not at all, so that a resumed run goes on exactly as an uninterrupted one would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from prefixcap.files import publish_dir, temporary_sibling
from prefixcap.persist import save_system
from prefixcap.training.errors import RunError
from prefixcap.training.optim import load_optimizer, optimizer_tensors
from prefixcap.training.rundir import latest_checkpoint, os_reason, write_jsonl

if TYPE_CHECKING:
    from prefixcap.training.trainer import Run


def write_failed(run: Run, target: str, error: BaseException) -> RunError:
    """A write the run needs failed (a full disk, a quota, a vanished mount): why, and what it can resume from."""
    return RunError(f"cannot write {target}: {os_reason(error)}; the previous checkpoint "
                    f"({latest_checkpoint(run.run_dir) or 'none'}) is intact: free space and run the same "
                    "command again to resume from it")  # fmt: skip


def save_checkpoint(run: Run) -> Path:
    """Write checkpoints/step-N completely or not at all; the previous checkpoints stay as they were."""
    bad = [n for n, p in run.system.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:  # a checkpoint to resume from must not be one that diverged
        raise RunError(f"weights are not finite after step {run.step} ({bad[0]}); not saving them. Last good "
                       f"checkpoint: {latest_checkpoint(run.run_dir) or 'none'}. Try a lower train.lr")  # fmt: skip
    final = run.run_dir / "checkpoints" / f"step-{run.step:07d}"
    tmp = temporary_sibling(final)
    try:
        save_system(run.system, tmp / "system")
        tensors, meta = optimizer_tensors(run.optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"step": run.step, "scheduler": run.scheduler.state_dict(), "optimizer": meta,
                 "history": run.history, "best": run.best,
                 "grad_scaler": run.scaler.state_dict() if run.scaler else None}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))  # last: marks it complete
        publish_dir(tmp, final)
    except Exception as e:  # a full disk, a quota, a vanished mount: say so, keep what was there
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(run, f"checkpoint {final}", e) from e
    keep = run.recipe.output.keep_last
    done = sorted((p for p in final.parent.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        if int(old.name.split("-")[1]) != run.best["step"]:  # the best one is kept besides the last K
            doomed = temporary_sibling(old, "old")  # renamed first: a kill mid-delete leaves no half checkpoint
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def resume(run: Run, checkpoint: Path) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    run.system.load_trained(checkpoint / "system")
    load_optimizer(run.optimizer, load_file(str(checkpoint / "optimizer.safetensors")), state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(checkpoint / "rng.safetensors"))["torch"])
    run.step, run.history, run.best = state["step"], state["history"], state["best"]
    run.train_seconds = run.history[-1].get("train_s", 0.0) if run.history else 0.0
    if run.scaler and state.get("grad_scaler"):
        run.scaler.load_state_dict(state["grad_scaler"])
    if run.main:
        write_jsonl(run.run_dir / "log.jsonl", run.history)  # drop what the interrupted run logged after it
