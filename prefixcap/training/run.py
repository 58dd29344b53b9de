"""`prefixcap run`: set up a run directory, train a recipe's system there, evaluate it, save it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from prefixcap.files import sweep_temporaries, write_atomic
from prefixcap.recipe import SLOTS, load_recipe
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
    system: Any = None  # what was trained (in eval mode), its weights those saved in run_dir/final


def start(recipe: Any, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, fresh: bool = False,
          report: Report = print, check_files: bool = True, system: Any = None) -> Run:  # fmt: skip
    """Set up a run: its directory, its system and data, and its state from the last checkpoint if there is one.
    ``check_files``: first check that the weights and data it needs are on disk (prefixcap.doctor), so a run that
    cannot start says everything it lacks at once and leaves no run directory behind (bench checks all entries).
    ``system``: train this system, composed from ``recipe``'s parts, instead of composing it again."""
    recipe = load_recipe(recipe, overrides)
    if recipe.base is not None:  # a language adapter on a trained system: the system is the base's, loaded
        if system is not None:
            raise RunError("a recipe with base: loads its system from the base; give no system with it")
        recipe, system = start_from_base(recipe)
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
    trainer = Run(recipe, run_dir, report, system=system)
    trainer.lock = lock
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        report(Resumed(checkpoint))
        trainer.resume(checkpoint)
    elif state.is_main_process:
        write_atomic(run_dir / "log.jsonl", "")
    return trainer


def run(recipe: Any, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, fresh: bool = False,
        stop_after: int | None = None, report: Report = print, system: Any = None) -> RunResult:  # fmt: skip
    """Train and evaluate a recipe. An existing run directory with checkpoints is resumed unless ``fresh``."""
    from accelerate import PartialState

    if not PartialState(cpu=on_cpu()).is_main_process:
        report = _quiet  # one process speaks for the run
    trainer = start(recipe, overrides, run_dir=run_dir, fresh=fresh, report=report, system=system)
    with trainer:
        report(Started(trainer.step, trainer.recipe.train.steps, trainer.compiled))
        trainer.fit(stop_after, report)
        metrics = trainer.finish() if trainer.done() else {}  # not done: stopped after `stop_after` steps
    trainer.system.eval()
    return RunResult(trainer.run_dir, metrics, trainer.step, trainer.history, trainer.main, trainer.system)


def train(what: Any, data: Any = None, *, run_dir: str | Path | None = None, overrides: Sequence[str] = (),
          fresh: bool = False, stop_after: int | None = None, report: Report = print,
          **settings: Any) -> RunResult:  # fmt: skip
    """Train a recipe, or a system composed in Python, then evaluate and save it: `prefixcap run` from Python.

        system = prefixcap.compose(encoder=..., connector="mlp", decoder=...)
        result = prefixcap.train(system, data="shapes", run_dir="runs/mine", steps=300, lr=1e-3)
        result.system.caption(images)     # the very object given, trained; result.run_dir / "final" is its save

    ``what``: a System (trained in place: its parts must say how they were built, as compose() and create() mark
    them, since checkpoints are saves) or anything load_recipe takes (a path, a recipe name, a dict, a Recipe).
    ``data``: the dataset section, a name or ``{"name": ..., **options}``, replacing the recipe's. ``settings``: train
    options (steps, lr, batch_size, ...: the recipe's ``train:`` section). ``overrides``: `--set`-style
    "key=value" strings, applied last. A run directory with checkpoints is resumed unless ``fresh``."""
    from prefixcap.interfaces import System

    system = what if isinstance(what, System) else None
    if system is not None:
        from prefixcap.persist import refuse_unrebuildable

        refuse_unrebuildable(system)
        base = system.recipe
    else:
        base = load_recipe(what)
    section = base.to_dict()
    if data is not None:
        section["data"] = _data_section(data)
    if settings:
        section["train"] = {**section.get("train", {}), **settings}
    recipe = load_recipe(section, overrides, origin=base)
    if system is not None:
        _refuse_changed_parts(system, recipe)
    return run(recipe, run_dir=run_dir, fresh=fresh, stop_after=stop_after, report=report, system=system)


def _data_section(data: Any) -> Any:
    from prefixcap.interfaces import DatasetSource
    from prefixcap.registry import built_spec

    if isinstance(data, DatasetSource):
        spec = built_spec(data)
        if spec is None:  # a run's recipe records its data, so that it can be resumed and its results read
            raise RunError("data: give it as a name or {name: ..., **options}, or a source made by "
                           "prefixcap.create('dataset', ...); this source does not say how to build it again")
        return spec
    return data


def _refuse_changed_parts(system: Any, recipe: Any) -> None:
    """An override of a part's section would be recorded in the run's recipe but not applied to the system given."""
    before = system.recipe.to_dict(resolved=True)
    after = recipe.to_dict(resolved=True)
    changed = [key for key in (*SLOTS, "losses", "image") if key != "data" and before.get(key) != after.get(key)]
    if changed:
        raise RunError(f"overrides change the given system's {', '.join(changed)}; compose a new system with them "
                       "(prefixcap.compose(recipe, overrides=...)) and train that")


def _quiet(event: Any) -> None:
    pass


def start_from_base(recipe: Any) -> tuple[Any, Any]:
    """A language run's recipe and system: the base system loaded, its parts' sections and losses in the recipe
    (``base:`` resolved away), and the new adapter added and made active. The base's saved files are only read."""
    from prefixcap.languages import caption_token_ids
    from prefixcap.persist import load_system, saved_system_dir
    from prefixcap.recipe import load_recipe
    from prefixcap.registry import create

    saved = saved_system_dir(recipe.base)
    system = load_system(saved)
    own = {k: v for k, v in recipe.to_dict().items() if k in recipe.model_fields_set and k != "base"}
    merged = {**system.recipe.to_dict(resolved=True), **own}
    resolved = load_recipe(merged, origin=recipe)
    name = resolved.language.name
    if name in system.languages:
        raise RunError(f"{recipe.location(('language', 'name'))}: {saved} has a {name!r} adapter already; "
                       "start from a system without one (its base)")  # fmt: skip
    tokens: list[int] = []
    source = create("dataset", resolved.data.name, resolved.data.options)
    if resolved.language.tokens:
        rows = source.rows("train")
        captions = ((c for i in range(len(rows)) for c in rows.captions(i)) if rows is not None
                    else (c for example in source.examples("train") for c in example.captions))  # fmt: skip
        tokens = caption_token_ids(system.decoder.tokenizer, captions)
    import torch

    with torch.random.fork_rng():  # LoRA's random A matrices: the same for the same seed, whatever ran before
        torch.manual_seed(resolved.train.seed)
        system.decoder.add_language(resolved.language, tokens)
    info: dict[str, Any] = {"base": str(saved)}
    if tokens and resolved.language.seed_tokens and (glossary := source.glossary()):
        info["seeded_tokens"] = system.decoder.seed_language(name, glossary)
    system.decoder.set_language(name)
    system.language_info = {**getattr(system, "language_info", {}), name: info}
    system.train()
    return resolved, system
