"""`prefixcap run`: set up a run directory, train a recipe's system there, evaluate it, save it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from prefixcap.files import sweep_temporaries, write_atomic
from prefixcap.recipe import load_recipe
from prefixcap.training.distributed import on_cpu
from prefixcap.training.errors import RunError
from prefixcap.training.events import Resumed, Started
from prefixcap.training.rundir import (latest_checkpoint, lock_run_dir, prepare_run_dir, refuse_foreign_files,
                                       resolve_run_dir)
from prefixcap.training.trainer import Report, Run


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a data-parallel launch, which stay quiet


def start(recipe: Any, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, fresh: bool = False,
          report: Report = print, check_files: bool = True) -> Run:  # fmt: skip
    """Set up a run: its directory, its system and data, and its state from the last checkpoint if there is one.
    ``check_files``: first check that the weights and data it needs are on disk (prefixcap.doctor), so a run that
    cannot start says everything it lacks at once and leaves no run directory behind (bench checks all entries)."""
    recipe = load_recipe(recipe, overrides)
    if recipe.data is None:
        raise RunError(f"{recipe.source}: no data section; add one, e.g. `data: shapes` (the offline world)")
    if check_files:
        from prefixcap.doctor import check, preflight

        preflight([check(recipe)], report, RunError)
    from accelerate import PartialState

    state = PartialState(cpu=on_cpu())  # under torchrun or `accelerate launch`: joins the other processes
    run_dir = resolve_run_dir(recipe, run_dir)
    lock = None
    if state.is_main_process:
        if fresh:
            refuse_foreign_files(run_dir)
        if run_dir.is_dir():
            lock = lock_run_dir(run_dir)  # before --fresh deletes anything: a live run's directory is refused
        prepare_run_dir(run_dir, fresh)
        lock = lock or lock_run_dir(run_dir)
        sweep_temporaries(run_dir)  # what a killed run was writing (checkpoints/ too); with the lock, nobody else is
        write_atomic(run_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.to_dict(resolved=True), sort_keys=False))
    state.wait_for_everyone()  # nobody looks for checkpoints before `fresh` has removed them
    trainer = Run(recipe, run_dir, report)
    trainer.lock = lock
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        report(Resumed(checkpoint))
        trainer.resume(checkpoint)
    elif state.is_main_process:
        write_atomic(run_dir / "log.jsonl", "")
    return trainer


def run(recipe: Any, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, fresh: bool = False,
        stop_after: int | None = None, report: Report = print) -> RunResult:  # fmt: skip
    """Train and evaluate a recipe. An existing run directory with checkpoints is resumed unless ``fresh``."""
    from accelerate import PartialState

    if not PartialState(cpu=on_cpu()).is_main_process:
        report = _quiet  # one process speaks for the run
    trainer = start(recipe, overrides, run_dir=run_dir, fresh=fresh, report=report)
    with trainer:
        report(Started(trainer.step, trainer.recipe.train.steps))
        trainer.fit(stop_after, report)
        if not trainer.done():  # stopped after `stop_after` steps, as an interruption would
            return RunResult(trainer.run_dir, {}, trainer.step, trainer.history, trainer.main)
        metrics = trainer.finish()
    return RunResult(trainer.run_dir, metrics, trainer.step, trainer.history, trainer.main)


def _quiet(event: Any) -> None:
    pass
