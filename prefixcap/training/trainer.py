"""The training loop: one Run holds the system, its data, the optimizer and the run's state.

Determinism is by construction, so a resumed run ends where an uninterrupted one would: the data order and the
reference drawn for each image are functions of (seed, epoch, index); the model's own randomness (dropout) comes
from the torch RNG, whose state each checkpoint keeps (training/state.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from torch import Tensor

from prefixcap.compose import compose
from prefixcap.data.loader import (CaptionSet, EvalItems, Items, MicroBatches, Preprocess, TrainItems, cache_features,
                                   fingerprint_update, index_split, loader)
from prefixcap.files import write_atomic
from prefixcap.interfaces import Batch, DatasetSource
from prefixcap.persist import save_system
from prefixcap.recipe import Recipe
from prefixcap.registry import create
from prefixcap.training import state
from prefixcap.training.compiled import can_compile_on_cpu, compiles
from prefixcap.training.curves import plot_curves
from prefixcap.training.distributed import global_token_mean, launched_processes, on_cpu, reduce_max
from prefixcap.training.errors import RunError, RunInterrupted
from prefixcap.training.evaluate import evaluate, items_batch, load_scorer, score_calibration, to_device, workers
from prefixcap.training.optim import make_optimizer
from prefixcap.training.events import Evaluated, Stepped, Stopped
from prefixcap.training.rundir import latest_checkpoint, write_jsonl
from prefixcap.training.signals import signals_end_the_step, signals_raise

Report = Callable[[Any], None]


class StepAbandoned(Exception):
    """A signal came between the micro-batches of a step: the step was dropped, the weights are the last step's."""

    def __init__(self, signum: int):
        self.signum = signum


def tensorboard_installed() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class Run:
    """One training run; ``prefixcap.training.run()`` is the way to start one."""

    def __init__(self, recipe: Recipe, run_dir: Path, report: Report = print, system: Any = None):
        """``system``: train this one (composed in Python, from ``recipe``'s parts) instead of composing ``recipe``."""
        from accelerate import Accelerator

        self.recipe, self.run_dir, t = recipe, run_dir, recipe.train
        self.lock = None  # run_dir/.lock while this run may write there (set by start())
        self.tensorboard = recipe.output.tensorboard is not False and tensorboard_installed()
        if recipe.output.tensorboard and not self.tensorboard:
            raise RunError(f"{recipe.location(('output', 'tensorboard'))}: output.tensorboard is true but the "
                           "tensorboard package is not installed: pip install 'prefixcap[tensorboard]', or set "
                           "output.tensorboard: false")  # fmt: skip
        # accelerate keeps one process-wide mixed-precision setting that cannot change once set, so a second run
        # with another precision in the same process (a notebook, `prefixcap bench`) would fail. Autocast is
        # applied here instead; accelerate still places the model, wraps it for DDP and handles accumulation. "no" is
        # said outright: unset, accelerate takes it from `accelerate config`, and the recipe would not decide alone.
        self.accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=on_cpu(), mixed_precision="no")
        self.main = self.accelerator.is_main_process
        if launched_processes() > 1 and self.accelerator.num_processes == 1:
            raise RunError(f"launched as {launched_processes()} processes, but accelerate cannot join them on "
                           f"{self.accelerator.device}: set ACCELERATE_USE_CPU=1 to train on the CPU")  # fmt: skip
        if t.batch_size % self.accelerator.num_processes:
            raise RunError(f"train.batch_size {t.batch_size} is the global batch, split evenly over processes: it "
                           f"must be divisible by the number of processes, {self.accelerator.num_processes}")  # fmt: skip
        device = self.accelerator.device.type
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device) if t.precision == "fp16" else None  # fp16 overflows without
        # Decided before the model and the data, so that a compile this machine cannot do fails in seconds.
        self.compiled = compiles(t, self.accelerator.device)
        if t.compile is True and self.accelerator.device.type == "cpu" and not can_compile_on_cpu():
            raise RunError(f"{recipe.location(('train', 'compile'))}: train.compile is true, but torch.compile cannot "
                           "build kernels here: it needs a C++ compiler (g++, or the one $CXX names) and a Python "
                           "torch.compile supports. Install one, or set train.compile: false")  # fmt: skip
        torch.manual_seed(t.seed)  # random-init parts (checkpoint: tiny) and new layers start the same every time
        self.system = compose(recipe) if system is None else system
        self.system.recipe, self.system.generate_config = recipe, recipe.generate  # what its saves record
        self.source: DatasetSource = create("dataset", recipe.data.name, recipe.data.options)
        self.headline = self.source.headline
        self.scorer = load_scorer(recipe, self.source)  # before the data: a missing model fails in seconds
        self.train_split = index_split(self.source, "train")
        self.val_split = index_split(self.source, "val", recipe.eval.max_examples)
        self.frozen_encoder = not any(p.requires_grad for p in self.system.encoder.parameters())
        self.cache_report = None
        if len(self.train_split) and self.frozen_encoder and self.system.accepts_features and t.cache_features:
            with self.accelerator.main_process_first():  # the others then read the features it cached
                self.cache_report = cache_features(self.system, self.train_split, dtype=t.cache_dtype,
                                                   num_workers=workers(recipe, decoding=True),
                                                   batch_size=recipe.eval.batch_size, report=report if self.main
                                                   else None, show_progress=self.main)  # fmt: skip
        if not len(self.train_split):
            raise RunError(f"data {recipe.data.name!r}: no usable training examples (every one lacks a caption or "
                           "its image could not be read)")  # fmt: skip
        self.optimizer, self.scheduler = make_optimizer(self.system, recipe)
        self.model, self.optimizer = self.accelerator.prepare(self.system, self.optimizer)
        # train.compile: the system's forward through torch.compile (backward too: AOTAutograd traces it). The
        # losses stay eager: clip-align reads caption text, which a graph would have to be recompiled for. The
        # wrapper is kept beside the model, so saving and loading see the module's own names.
        self.forward = torch.compile(self.model) if self.compiled else self.model
        self.step = 0
        self.train_seconds = 0.0  # in training steps only: evaluation and checkpoints are not counted
        self.step_times: list[tuple[float, float]] = []  # (data s, compute s) of each step this process took
        self.data_seen = hashlib.sha256()  # every (index, caption) trained on, in order: `prefixcap bench` checks it
        self.data_items, self.data_busy_s = 0, 0.0  # examples the data path delivered, and the seconds it spent
        self.train_workers = 0
        self.history: list[dict[str, Any]] = []
        self._batches: Iterator[Items] | None = None  # the training DataLoader, started at the first step
        self._blank_features: Tensor | None = None  # the encoder's output for a blank image (train.blank_images)
        self._signal = [0]  # set by a SIGINT or SIGTERM while fit() runs
        # Early stopping and the best checkpoint: part of the saved state, so a resumed run stops where it would have.
        self.best: dict[str, Any] = {"value": None, "step": None, "stale": 0}

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Stop the data workers and let another run use the run directory."""
        self._batches = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def save_checkpoint(self) -> Path:
        return state.save_checkpoint(self)

    def resume(self, checkpoint: Path) -> None:
        state.resume(self, checkpoint)

    # --- training ------------------------------------------------------------------------------------------------

    def micro_batch(self) -> Batch:
        """This process's slice of the next micro-batch of the endless stream of shuffled epochs. Which examples and
        captions it holds is a pure function of (seed, micro-batch number), computed by the sampler, so the
        processes' slices together are the micro-batch a single process would take, and a resumed run takes the
        ones an uninterrupted run would have."""
        t = self.recipe.train
        features = self.train_split.features is not None
        if self._batches is None:
            sampler = MicroBatches(len(self.train_split), t.seed, t.batch_size, self.accelerator.num_processes,
                                   self.accelerator.process_index, start=self.step * t.grad_accum)  # fmt: skip
            self.train_workers = workers(self.recipe, decoding=not features)
            items = TrainItems(self.train_split, t.seed, Preprocess(self.system.encoder))
            pin = self.accelerator.device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
            self._batches = iter(loader(items, workers=self.train_workers, batch_sampler=sampler, pin_memory=pin))
        while True:
            items = next(self._batches)
            self.data_items += items.size
            self.data_busy_s += items.seconds
            self.train_split.broken.update(items.broken)  # an unreadable image costs its example
            fingerprint_update(self.data_seen, items.rows, items.captions)
            if len(items):
                break
        batch = to_device(items_batch(self.system, items, t.max_caption_tokens, features), self.accelerator.device)
        return self.blank_some(batch, items.rows) if t.blank_images else batch

    def blank_some(self, batch: Batch, rows: Any) -> Batch:
        """Show a train.blank_images share of the batch a blank image (see TrainConfig): whether an example is blanked
        is a pure function of (seed, step, its row), so a resumed run blanks the ones an uninterrupted run would
        have, and processes that each take a slice of a micro-batch blank what one process taking it whole would."""
        t = self.recipe.train
        draws = [random.Random(f"prefixcap-blank/{t.seed}/{self.step}/{int(row)}").random() for row in rows]
        blank = torch.tensor([draw < t.blank_images for draw in draws])
        batch.blank = blank.to(self.accelerator.device)
        if batch.features is None:
            batch.pixel_values = batch.pixel_values.masked_fill(batch.blank[:, None, None, None], 0)
            return batch
        if self._blank_features is None:  # the encoder's output for the blank image: what scoring will feed it
            size = self.system.encoder.preprocessing.size
            with torch.no_grad():
                self._blank_features = self.system.encoder(torch.zeros(1, 3, size, size, device=batch.features.device))
        batch.features = torch.where(batch.blank[:, None, None], self._blank_features.to(batch.features.dtype),
                                     batch.features)  # fmt: skip
        return batch

    def pixels(self, split: CaptionSet, n: int) -> Tensor:
        """The first ``n`` readable images of ``split``, preprocessed (for timing captioning, not for training)."""
        out = []
        for items in loader(EvalItems(split, Preprocess(self.system.encoder), rgb=False), workers=0, batch_size=n):
            out += list(items.x) if items.x is not None else []
            if len(out) >= n:
                break
        return torch.stack(out[:n])

    def data_images_per_s(self) -> float | None:
        """What the data path can deliver: images read per second of reading, times the processes reading."""
        if not self.data_busy_s:
            return None
        return round(self.data_items / self.data_busy_s * max(1, self.train_workers), 1)

    def train_step(self) -> float:
        t = self.recipe.train
        self.model.train()
        total, data_s, started = 0.0, 0.0, time.perf_counter()
        rng = torch.get_rng_state()
        for micro in range(t.grad_accum):
            if micro and (signum := self.signal_received()):  # a long accumulated step still ends promptly
                self.abandon_step(rng)
                raise StepAbandoned(signum)
            tic = time.perf_counter()
            batch = self.micro_batch()
            data_s += time.perf_counter() - tic
            with self.accelerator.accumulate(self.model), self.trains_only():
                with self.autocast():
                    outputs = self.forward(batch)
                    loss = self.system.total_loss(outputs, batch)
                loss, batch_loss = global_token_mean(self.accelerator, loss, outputs.labels)
                if not math.isfinite(batch_loss):
                    last = latest_checkpoint(self.run_dir)
                    raise RunError(f"loss is {batch_loss} at step {self.step + 1}; stopping. Last good checkpoint: "
                                   f"{last or 'none'}. Try a lower train.lr or train.precision: fp32")  # fmt: skip
                self.accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)
                if self.accelerator.sync_gradients:  # the last micro-batch of this step
                    if self.scaler:
                        self.scaler.unscale_(self.optimizer)
                    if t.max_grad_norm:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                    if self.scaler:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            total += batch_loss / t.grad_accum
        self.scheduler.step()
        self.step += 1
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # the optimiser step is queued, not done, until then
        elapsed = time.perf_counter() - started
        self.step_times.append((data_s, elapsed - data_s))
        self.train_seconds += elapsed
        return total

    def trains_only(self) -> contextlib.AbstractContextManager:
        """A language run computes gradients for its adapter alone (the base's own flags are kept for saving)."""
        if self.recipe.language is None:
            return contextlib.nullcontext()
        from prefixcap.languages import only_language_trains

        return only_language_trains(self.system, self.recipe.language.name)

    def abandon_step(self, rng: Tensor) -> None:
        """Undo what a step that will not finish did: its accumulated gradients, and the random numbers it drew
        (dropout), so that a checkpoint now is the last complete step's exactly."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)

    def interrupted_mid_step(self, signum: int) -> RunInterrupted:
        """Checkpoint the last complete step (unless it is saved, or none was taken) and say how the run ended."""
        last = latest_checkpoint(self.run_dir)
        if self.main and self.step and (last is None or last.name != f"step-{self.step:07d}"):
            self.save_checkpoint()
        return RunInterrupted(signum, self.step, latest_checkpoint(self.run_dir))

    def evaluate(self, split: CaptionSet) -> tuple[dict[str, float], list[dict[str, Any]]]:
        losses = contextlib.nullcontext()
        if self.recipe.language is not None:  # the loss a language adapter is chosen by is its captions'
            from prefixcap.languages import caption_losses_only

            losses = caption_losses_only(self.system)
        with losses:
            metrics, samples = evaluate(self.system, self.source, split, self.recipe, self.scorer)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            # Every process evaluates the same model, but only the main process's numbers are used, so the
            # processes can never disagree on the best step or on stopping early.
            metrics = broadcast_object_list([metrics])[0]
        return metrics, samples

    # --- when to stop --------------------------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        budget = self.recipe.train.max_seconds
        # the processes' clocks differ: all stop when the slowest is out
        return budget is not None and reduce_max(self.accelerator, self.train_seconds) >= budget

    def done(self) -> bool:
        return self.step >= self.recipe.train.steps or self.stopped_early() or self.out_of_time()

    def stopped_early(self) -> bool:
        patience = self.recipe.eval.patience
        return patience is not None and self.best["stale"] > patience

    def track_best(self, value: float | None) -> bool:
        """Record a validation value of eval.metric; True when it is the best so far."""
        if value is None:
            return False
        best, higher = self.best["value"], self.recipe.eval.higher_is_better
        if best is None or (value > best if higher else value < best):
            self.best = {"value": value, "step": self.step, "stale": 0}
            return True
        self.best = {**self.best, "stale": self.best["stale"] + 1}
        return False

    def signal_received(self) -> int:
        """The signal that asked this run to stop (0: none); under data parallelism, any process's, so all stop."""
        return int(reduce_max(self.accelerator, self._signal[0]))

    # --- the loop ------------------------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None, report: Report = print) -> None:
        """Train to train.steps (or stop early after ``stop_after`` steps, as an interruption would)."""
        t, out, ev = self.recipe.train, self.recipe.output, self.recipe.eval
        every_eval = ev.every_steps or t.steps
        started, seen = time.perf_counter(), 0
        with contextlib.ExitStack() as stack:
            log = stack.enter_context((self.run_dir / "log.jsonl").open("a")) if self.main else None
            tensorboard = self.tensorboard_writer() if self.main and self.tensorboard else None
            if tensorboard:
                stack.callback(tensorboard.close)
            stack.enter_context(signals_end_the_step(self._signal))
            while not self.done():
                try:
                    loss = self.train_step()
                except StepAbandoned as e:
                    raise self.interrupted_mid_step(e.signum) from None
                seen += t.batch_size * t.grad_accum
                last = self.step == t.steps or self.out_of_time()
                lr = self.scheduler.get_last_lr()[0]
                row: dict[str, Any] = {"step": self.step, "loss": round(loss, 6), "lr": lr,
                                       "train_s": round(self.train_seconds, 4)}  # fmt: skip
                if self.step % out.log_every_steps == 0 or last:
                    row["samples_per_s"] = round(seen / (time.perf_counter() - started), 2)
                    row["data_images_per_s"] = self.data_images_per_s()
                    report(Stepped(self.step, loss, lr, row["samples_per_s"], row["data_images_per_s"]))
                improved = False
                if self.step % every_eval == 0 or last:
                    metrics, _ = self.evaluate(self.val_split)
                    row["val"] = {k: round(v, 6) for k, v in metrics.items()}
                    report(Evaluated(self.step, row["val"], self.headline))
                    improved = self.track_best(metrics.get(ev.metric))
                self.history.append(row)  # before any checkpoint, which keeps the history it was saved with
                if log:
                    try:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    except OSError as e:
                        raise state.write_failed(self, str(self.run_dir / "log.jsonl"), e) from e
                if tensorboard:
                    scalars = {f"train/{k}": v for k, v in row.items() if k not in ("step", "val")}
                    scalars.update({f"val/{k}": v for k, v in row.get("val", {}).items()})
                    for tag, value in scalars.items():
                        tensorboard.add_scalar(tag, value, self.step)
                stop = self.stopped_early()
                periodic = bool(out.save_every_steps) and self.step % out.save_every_steps == 0
                signum = self.signal_received()
                if self.main and (improved or periodic or stop or last or signum):
                    self.save_checkpoint()
                if signum:
                    raise RunInterrupted(signum, self.step, latest_checkpoint(self.run_dir))
                if stop:
                    stale = self.best["stale"]
                    report(Stopped(self.step, f"{ev.metric} did not improve for {stale} evaluations"))
                    break
                if stop_after is not None and self.step >= stop_after:
                    break

    def write_results(self, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        """final/, metrics.json, samples.jsonl and the curves; a full disk is reported like a checkpoint's. final/
        is written first and whole (its model card already holds the metrics), so a run with metrics.json has it."""
        writes = [(self.run_dir / "final", lambda path: save_system(self.system, path, metrics)),
                  (self.run_dir / "metrics.json", lambda path: write_atomic(path, json.dumps(metrics, indent=2) + "\n")),
                  (self.run_dir / "samples.jsonl", lambda path: write_jsonl(path, samples)),
                  (self.run_dir / "curves.png", lambda path: plot_curves(self.history, path, self.headline))]  # fmt: skip
        for path, write in writes:
            try:
                write(path)
            except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
                raise state.write_failed(self, str(path), e) from e

    def record_language(self, metrics: dict[str, Any]) -> None:
        name = self.recipe.language.name
        adapter = sum(p.numel() for p in self.system.decoder.language_parameters(name))
        total = sum(p.numel() for p in self.system.parameters()) - sum(
            p.numel() for other in self.system.languages for p in self.system.decoder.language_parameters(other))
        info = self.system.language_info.setdefault(name, {})
        info.update({"parameters": adapter, "share_of_system": round(adapter / total, 6),
                     "train_seconds": round(self.train_seconds, 1), "steps": self.step,
                     "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})  # fmt: skip

    def tensorboard_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        # Hides what an interrupted run logged after the checkpoint this one resumed from (it is logged again).
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)

    def finish(self) -> dict[str, float]:
        """Evaluate on the held-out split and write final/, metrics.json, samples.jsonl and the curves."""
        # Nothing here ends after a step: a signal ends it at once, and the last step's checkpoint is resumed from.
        with signals_raise(lambda signum: RunInterrupted(signum, self.step, latest_checkpoint(self.run_dir))):
            test = index_split(self.source, "test", self.recipe.eval.max_examples)
            split = test if len(test) else self.val_split
            metrics, samples = self.evaluate(split)
            metrics = {f"{split.name}_{k}": v for k, v in metrics.items()}
            if self.recipe.language is not None:  # the manifest lists each language with what it scored
                self.record_language(metrics)
            if self.main and len(self.val_split):  # saved with the system: `caption --min-score`'s default
                self.system.score_calibration = score_calibration(self.system, self.val_split, self.recipe)
            skipped = sum(s.skipped + len(s.broken) for s in (self.train_split, self.val_split, test))
            metrics.update({"steps": self.step, "train_examples": len(self.train_split), "skipped_images": skipped,
                            "best_step": self.best["step"], f"best_val_{self.recipe.eval.metric}": self.best["value"]})
            if self.main:
                self.write_results(metrics, samples)
        self.accelerator.wait_for_everyone()  # so that every process returns with the run directory complete
        return metrics
