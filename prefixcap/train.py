"""`prefixcap run`: train a recipe's system on its data, evaluate it, leave a run directory.

    runs/<recipe>/
      recipe.resolved.yaml   every option spelled out
      log.jsonl              one line per logged step and per evaluation
      checkpoints/step-N/    system/ (as System.save), optimizer.safetensors, trainer_state.json; last K kept
      final/                 the trained system (prefixcap.load), metrics.json, samples.jsonl

Determinism is by construction, so a resumed run ends where an uninterrupted one would: the data order and the
reference drawn for each image are functions of (seed, epoch, index); the model's own randomness (dropout) comes
from the torch RNG, whose state each checkpoint keeps.

Under `torchrun` or `accelerate launch` the same command trains data parallel: train.batch_size stays the global
batch, each process takes its own slice of every micro-batch, and only the main process writes the run directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from prefixcap.compose import compose
from prefixcap.errors import PrefixcapError, summary
from prefixcap.data.loader import (CaptionSet, EvalItems, Items, MicroBatches, Preprocess, TrainItems, cache_features,
                                   default_workers, fingerprint_update, index_split, loader)
from prefixcap.interfaces import Batch, DatasetSource, System
from prefixcap.metrics.clipscore import DEFAULT_CHECKPOINT, ClipScorer
from prefixcap.persist import publish_dir, save_system, sweep_temporaries, temporary_sibling, write_atomic
from prefixcap.recipe import Recipe, load_recipe
from prefixcap.registry import create


class RunError(PrefixcapError):
    """A run cannot start or continue (unwritable directory, no data, diverged loss, ...)."""


class RunInterrupted(RunError):
    """SIGINT or SIGTERM stopped training after a complete step and a checkpoint; running again resumes there."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # what a shell reports for a process that signal ended
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         "written: run the same command again to resume")  # fmt: skip


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a data-parallel launch, which stay quiet


# --- data ------------------------------------------------------------------------------------------------------


def load_scorer(recipe: Recipe, source: DatasetSource) -> ClipScorer | None:
    """The recipe's CLIPScore model, loaded before training so that a missing one costs seconds, not a run."""
    name = recipe.eval.clip_model
    if name == "auto":
        name = source.clip_model or DEFAULT_CHECKPOINT
    if name is None:
        return None
    try:
        return ClipScorer.from_pretrained(name)
    except PrefixcapError as e:
        raise RunError(f"{e} (eval.clip_model picks the CLIPScore model; set it to null to skip CLIPScore)") from e


def workers(recipe: Recipe, decoding: bool) -> int:
    n = recipe.train.num_workers
    return default_workers(decoding) if n == "auto" else n


def make_batch(system: System, items: Items, max_tokens: int, features: bool = False) -> Batch:
    """A batch from a worker's readable items: their pixels, or their cached features when ``features``."""
    input_ids, mask, labels = system.tokenize(items.captions, max_tokens)
    return Batch(pixel_values=None if features else items.x, input_ids=input_ids, attention_mask=mask, labels=labels,
                 features=items.x if features else None, captions=items.captions,
                 references=items.references)  # fmt: skip


# --- optimisation ----------------------------------------------------------------------------------------------


def make_optimizer(system: System, recipe: Recipe) -> tuple[torch.optim.Optimizer, Any]:
    t = recipe.train
    groups = [{"params": g.params, "lr": g.lr or t.lr, "name": g.name,
               "weight_decay": t.weight_decay if g.weight_decay is None else g.weight_decay}
              for g in system.param_groups()]  # fmt: skip
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


# --- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(system: System, source: DatasetSource, split: CaptionSet, recipe: Recipe,
             scorer: ClipScorer | None = None) -> tuple[dict[str, float], list]:  # fmt: skip
    """Captions, loss and metrics for a split, streamed: workers decode a batch of images at a time, and only the
    captions and per-image scores are kept (CIDEr and the oracle need every caption; no image is kept)."""
    from PIL import Image

    from prefixcap.metrics.captioning import caption_metrics

    system.eval()
    device = next(system.parameters()).device
    items_in = loader(EvalItems(split, Preprocess(system.encoder), rgb=scorer is not None),
                      workers=workers(recipe, decoding=True), batch_size=recipe.eval.batch_size)  # fmt: skip
    captions: list[str] = []
    references: list[list[str]] = []
    rows: list[int] = []
    clip, ref_clip = [], []
    loss_sum = 0.0
    for items in items_in:
        split.broken.update(items.broken)
        if not len(items):
            continue
        batch = make_batch(system, items, recipe.train.max_caption_tokens)
        generated = system.generate(batch.pixel_values.to(device), recipe.generate)
        loss_sum += float(system.loss(_to(batch, device))[0]) * len(items)
        if scorer is not None:
            embedded = scorer.image_embeddings([Image.fromarray(rgb) for rgb in items.rgb])
            scores = scorer.score_embedded(embedded, generated, items.references)
            clip += scores.per_image_clip_s
            ref_clip += scores.per_image_ref_clip_s
        captions += generated
        references += items.references
        rows += items.rows
    metrics = {"loss": loss_sum / max(1, len(captions))}
    metrics.update(caption_metrics(captions, references))
    metrics.update(source.task_metrics(split.name, rows, captions))
    samples = [{"index": i, "caption": c, "references": r} for i, c, r in zip(rows, captions, references)]
    if clip:
        metrics.update(clip_s=sum(clip) / len(clip), ref_clip_s=sum(ref_clip) / len(ref_clip))
        for sample, s, ref in zip(samples, clip, ref_clip):
            sample.update(clip_s=round(s, 5), ref_clip_s=round(ref, 5))
    return metrics, samples


def _to(batch: Batch, device: torch.device) -> Batch:
    for name, value in vars(batch).items():
        if isinstance(value, Tensor):
            setattr(batch, name, value.to(device, non_blocking=value.is_pinned()))
    return batch


# --- the run ---------------------------------------------------------------------------------------------------


def _recipe_name(recipe: Recipe) -> str:
    return Path(recipe.source).stem if recipe.source != "<dict>" else "run"


def _run_dir(recipe: Recipe, given: str | Path | None) -> Path:
    """Where the run writes: ``given`` (--out), else the recipe's output.dir. A recipe file may come from anyone, so
    its own output.dir must stay under the working directory; a place outside it is the user's to choose, with --out
    or --set output.dir=..."""
    if given is not None:
        return Path(given)
    raw = recipe.output.dir
    try:
        path = Path(raw.format(recipe=_recipe_name(recipe)))
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise RunError(f"{recipe.location(('output', 'dir'))}: output.dir {raw!r}: the only placeholder is "
                       f"{{recipe}} ({summary(e)})") from None  # fmt: skip
    from_file = recipe.source != "<dict>" and ("output", "dir") not in recipe._overridden
    if from_file and (path.is_absolute() or ".." in path.parts):
        raise RunError(f"{recipe.location(('output', 'dir'))}: output.dir {raw!r} leaves the working directory; a "
                       "recipe writes only below it unless you choose the place: --out DIR or --set output.dir=DIR")
    return path


def _prepare_run_dir(run_dir: Path, fresh: bool) -> None:
    if fresh and run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "recipe.resolved.yaml").exists():
        raise RunError(f"--fresh would delete {run_dir}, which is not a prefixcap run directory (no "
                       "recipe.resolved.yaml): remove it yourself or choose another --out")  # fmt: skip
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:  # found now, not after an hour of training
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None


def _lock_run_dir(run_dir: Path):
    """Hold run_dir/.lock for the life of the returned file: a second run on the same directory would interleave
    checkpoints and logs with this one, so it is refused. The lock dies with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one run per directory is then the user's to keep
        return None
    try:
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:  # a read-only directory that holds an earlier run
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise RunError(f"run directory {run_dir} is in use by another prefixcap run (pid {holder}): wait for it to "
                       "end, or choose another --out") from None  # fmt: skip
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _os_reason(error: BaseException) -> str:
    """Why a write failed, in a few words (safetensors wraps the OSError's text in its own message)."""
    return (error.strerror if isinstance(error, OSError) and error.strerror else None) or summary(error)


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun and `accelerate launch`


def _on_cpu() -> bool:
    """accelerate joins the processes of a launch through an accelerator (GPU) unless told to use the CPU; without
    this, `torchrun` on a machine without one would start independent runs that overwrite each other's files."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    if _launched_processes() == 1:
        return False  # accelerate picks the device, as for any single process
    return not (torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available())


def _tensorboard_installed() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class Run:
    """One training run; ``run()`` below is the way to start one."""

    def __init__(self, recipe: Recipe, run_dir: Path, report=print):
        from accelerate import Accelerator

        self.recipe, self.run_dir, t = recipe, run_dir, recipe.train
        self.lock = None  # run_dir/.lock while this run may write there (set by start())
        self.tensorboard = recipe.output.tensorboard is not False and _tensorboard_installed()
        if recipe.output.tensorboard and not self.tensorboard:
            raise RunError(f"{recipe.location(('output', 'tensorboard'))}: output.tensorboard is true but the "
                           "tensorboard package is not installed: pip install 'prefixcap[tensorboard]', or set "
                           "output.tensorboard: false")  # fmt: skip
        # accelerate keeps one process-wide mixed-precision setting that cannot change once set, so a second run
        # with another precision in the same process (a notebook, `prefixcap bench`) would fail. Autocast is
        # applied here instead; accelerate still places the model, wraps it for DDP and handles accumulation.
        self.accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=_on_cpu())
        self.main = self.accelerator.is_main_process
        if _launched_processes() > 1 and self.accelerator.num_processes == 1:
            raise RunError(f"launched as {_launched_processes()} processes, but accelerate cannot join them on "
                           f"{self.accelerator.device}: set ACCELERATE_USE_CPU=1 to train on the CPU")  # fmt: skip
        if t.batch_size % self.accelerator.num_processes:
            raise RunError(f"train.batch_size {t.batch_size} is the global batch, split evenly over processes: it "
                           f"must be divisible by the number of processes, {self.accelerator.num_processes}")  # fmt: skip
        device = self.accelerator.device.type
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device) if t.precision == "fp16" else None  # fp16 overflows without
        torch.manual_seed(t.seed)  # random-init parts (checkpoint: tiny) and new layers start the same every time
        self.system = compose(recipe)
        self.source: DatasetSource = create("dataset", recipe.data.name, recipe.data.options)
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
        self.step = 0
        self.train_seconds = 0.0  # in training steps only: evaluation and checkpoints are not counted
        self.step_times: list[tuple[float, float]] = []  # (data s, compute s) of each step this process took
        self.data_seen = hashlib.sha256()  # every (index, caption) trained on, in order: `prefixcap bench` checks it
        self.data_items, self.data_busy_s = 0, 0.0  # examples the data path delivered, and the seconds it spent
        self.history: list[dict[str, Any]] = []
        self._batches: Iterator[Items] | None = None  # the training DataLoader, started at the first step
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

    # checkpoints
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N completely or not at all; the previous checkpoints stay as they were."""
        bad = [n for n, p in self.system.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:  # a checkpoint to resume from must not be one that diverged
            raise RunError(f"weights are not finite after step {self.step} ({bad[0]}); not saving them. Last good "
                           f"checkpoint: {latest_checkpoint(self.run_dir) or 'none'}. Try a lower train.lr")  # fmt: skip
        final = self.run_dir / "checkpoints" / f"step-{self.step:07d}"
        tmp = temporary_sibling(final)
        try:
            save_system(self.system, tmp / "system")
            tensors, meta = optimizer_tensors(self.optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "optimizer": meta,
                     "history": self.history, "best": self.best,
                     "grad_scaler": self.scaler.state_dict() if self.scaler else None}  # fmt: skip
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))  # last: marks it complete
            publish_dir(tmp, final)
        except Exception as e:  # a full disk, a quota, a vanished mount: say so, keep what was there
            shutil.rmtree(tmp, ignore_errors=True)
            raise self.write_failed(f"checkpoint {final}", e) from e
        keep = self.recipe.output.keep_last
        done = sorted((p for p in final.parent.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            if int(old.name.split("-")[1]) != self.best["step"]:  # the best one is kept besides the last K
                doomed = temporary_sibling(old, "old")  # renamed first: a kill mid-delete leaves no half checkpoint
                old.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        return final

    def write_failed(self, target: str, error: BaseException) -> RunError:
        """A write the run needs failed (a full disk, a quota, a vanished mount): why, and what it can resume from."""
        return RunError(f"cannot write {target}: {_os_reason(error)}; the previous checkpoint "
                        f"({latest_checkpoint(self.run_dir) or 'none'}) is intact: free space and run the same "
                        "command again to resume from it")  # fmt: skip

    def resume(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.system.load_trained(checkpoint / "system")
        load_optimizer(self.optimizer, load_file(str(checkpoint / "optimizer.safetensors")), state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(load_file(str(checkpoint / "rng.safetensors"))["torch"])
        self.step, self.history, self.best = state["step"], state["history"], state["best"]
        self.train_seconds = self.history[-1].get("train_s", 0.0) if self.history else 0.0
        if self.scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.main:
            _write_jsonl(self.run_dir / "log.jsonl", self.history)  # drop what the interrupted run logged after it

    # training
    def micro_batch(self) -> Batch:
        """This process's slice of the next micro-batch of the endless stream of shuffled epochs. Which examples and
        captions it holds is a pure function of (seed, micro-batch number), computed by the sampler, so the
        processes' slices together are the micro-batch a single process would take, and a resumed run takes the
        ones an uninterrupted run would have."""
        t = self.recipe.train
        if self._batches is None:
            features = self.train_split.features is not None
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
        batch = make_batch(self.system, items, t.max_caption_tokens, features=self.train_split.features is not None)
        return _to(batch, self.accelerator.device)

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
        return round(self.data_items / self.data_busy_s * max(1, getattr(self, "train_workers", 0)), 1)

    def train_step(self) -> float:
        t = self.recipe.train
        self.model.train()
        total, data_s, started = 0.0, 0.0, time.perf_counter()
        for j in range(t.grad_accum):
            tic = time.perf_counter()
            batch = self.micro_batch()
            data_s += time.perf_counter() - tic
            with self.accelerator.accumulate(self.model):
                with self.autocast():
                    outputs = self.model(batch)
                    loss, _ = self.system.compute_loss(outputs, batch)
                loss, batch_loss = self.global_token_mean(loss, outputs.labels)
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

    def global_token_mean(self, loss: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """(this process's loss rescaled for DDP, the loss of the whole micro-batch) from this process's loss.

        The caption loss is a mean over this slice's caption tokens and DDP averages gradients over processes; when
        the slices hold different numbers of tokens, the mean of their means is not the token mean of the whole
        micro-batch that one process would take the gradient of. Weighting each slice by its share of the tokens
        (times the number of processes, which DDP divides by again) makes the two gradients equal. Losses that are
        means over examples (clip-align) get the same weights, which average to 1 over the processes. The batch
        loss is the same number on every process, so a non-finite loss on one of them stops them all."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return loss, float(loss.detach())
        tokens = (labels != -100).sum().float()
        total_tokens, total_loss = self.accelerator.reduce(torch.stack([tokens, loss.detach().float() * tokens]), "sum")
        return loss * (tokens * processes / total_tokens), float(total_loss / total_tokens)

    def evaluate(self, split: CaptionSet) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics, samples = evaluate(self.system, self.source, split, self.recipe, self.scorer)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            # Every process evaluates the same model, but only the main process's numbers are used, so the
            # processes can never disagree on the best step or on stopping early.
            metrics = broadcast_object_list([metrics])[0]
        return metrics, samples

    def out_of_time(self) -> bool:
        budget = self.recipe.train.max_seconds
        if budget is None:
            return False
        spent = self.train_seconds
        if self.accelerator.num_processes > 1:  # the processes' clocks differ: all stop when the slowest is out
            spent = float(self.accelerator.reduce(torch.tensor(spent, device=self.accelerator.device), "max"))
        return spent >= budget

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

    def fit(self, stop_after: int | None = None, report=print) -> None:
        """Train to train.steps (or stop early after ``stop_after`` steps, as an interruption would)."""
        t, out, ev = self.recipe.train, self.recipe.output, self.recipe.eval
        every_eval = ev.every_steps or t.steps
        started, seen = time.perf_counter(), 0
        with contextlib.ExitStack() as stack:
            log = stack.enter_context((self.run_dir / "log.jsonl").open("a")) if self.main else None
            tensorboard = self.tensorboard_writer() if self.main and self.tensorboard else None
            if tensorboard:
                stack.callback(tensorboard.close)
            stack.enter_context(self.signals_end_the_step())
            while not self.done():
                loss = self.train_step()
                seen += t.batch_size * t.grad_accum
                last = self.step == t.steps or self.out_of_time()
                row: dict[str, Any] = {"step": self.step, "loss": round(loss, 6),
                                       "lr": self.scheduler.get_last_lr()[0], "train_s": round(self.train_seconds, 4)}
                if self.step % out.log_every_steps == 0 or last:
                    row["samples_per_s"] = round(seen / (time.perf_counter() - started), 2)
                    row["data_images_per_s"] = self.data_images_per_s()
                    report(row)
                improved = False
                if self.step % every_eval == 0 or last:
                    metrics, _ = self.evaluate(self.val_split)
                    row["val"] = {k: round(v, 6) for k, v in metrics.items()}
                    report({"step": self.step, "val": row["val"]})
                    improved = self.track_best(metrics.get(ev.metric))
                self.history.append(row)  # before any checkpoint, which keeps the history it was saved with
                if log:
                    try:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    except OSError as e:
                        raise self.write_failed(str(self.run_dir / "log.jsonl"), e) from e
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
                    report({"step": self.step, "early_stop": f"{ev.metric} did not improve for {stale} evaluations"})
                    break
                if stop_after is not None and self.step >= stop_after:
                    break

    @contextlib.contextmanager
    def signals_end_the_step(self):
        """While training, SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption notice) end the run after the
        current step and a checkpoint, instead of wherever the signal lands. The first one restores the previous
        handlers, so a second signal stops a run that is stuck the usual way."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may handle signals (a run started from a worker thread keeps the defaults)
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

        def handler(signum, frame) -> None:
            self._signal = signum
            restore()

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            restore()

    def signal_received(self) -> int:
        """The signal that asked this run to stop (0: none); under data parallelism, any process's, so all stop."""
        if self.accelerator.num_processes == 1:
            return self._signal
        got = torch.tensor(self._signal, device=self.accelerator.device)
        return int(self.accelerator.reduce(got, "max"))

    def tensorboard_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        # Hides what an interrupted run logged after the checkpoint this one resumed from (it is logged again).
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)

    def finish(self) -> dict[str, float]:
        """Evaluate on the held-out split and write final/, metrics.json, samples.jsonl and the curves."""
        test = index_split(self.source, "test", self.recipe.eval.max_examples)
        split = test if len(test) else self.val_split
        metrics, samples = self.evaluate(split)
        metrics = {f"{split.name}_{k}": v for k, v in metrics.items()}
        skipped = sum(s.skipped + len(s.broken) for s in (self.train_split, self.val_split, test))
        metrics.update({"steps": self.step, "train_examples": len(self.train_split), "skipped_images": skipped,
                        "best_step": self.best["step"], f"best_val_{self.recipe.eval.metric}": self.best["value"]})
        if self.main:
            save_system(self.system, self.run_dir / "final")
            write_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            _write_jsonl(self.run_dir / "samples.jsonl", samples)
            plot_curves(self.history, self.run_dir / "curves.png")
        self.accelerator.wait_for_everyone()  # so that every process returns with the run directory complete
        return metrics


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss", lw=1)
    evals = [r for r in history if "val" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val"]["loss"] for r in evals], "o-", label="val loss")
        accuracy = [r for r in evals if "oracle_accuracy" in r["val"]]
        if accuracy:
            twin = ax.twinx()
            twin.plot([r["step"] for r in accuracy], [r["val"]["oracle_accuracy"] for r in accuracy], "s-",
                      color="tab:green", label="val exact-scene accuracy")  # fmt: skip
            twin.set_ylim(0, 1)
            twin.set_ylabel("accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _quiet(row: dict[str, Any]) -> None:
    pass


def start(recipe: Any, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, fresh: bool = False,
          report=print) -> Run:  # fmt: skip
    """Set up a run: its directory, its system and data, and its state from the last checkpoint if there is one."""
    recipe = load_recipe(recipe, overrides)
    if recipe.data is None:
        raise RunError(f"{recipe.source}: no data section; add one, e.g. `data: shapes` (the offline world)")
    from accelerate import PartialState

    state = PartialState(cpu=_on_cpu())  # under torchrun or `accelerate launch`: joins the other processes
    run_dir = _run_dir(recipe, run_dir)
    lock = None
    if state.is_main_process:
        if not fresh and run_dir.is_dir():
            lock = _lock_run_dir(run_dir)  # before --fresh deletes anything a live run is using
        _prepare_run_dir(run_dir, fresh)
        lock = lock or _lock_run_dir(run_dir)
        sweep_temporaries(run_dir)  # what a killed run was writing (checkpoints/ too); with the lock, nobody else is
        write_atomic(run_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.to_dict(resolved=True), sort_keys=False))
    state.wait_for_everyone()  # nobody looks for checkpoints before `fresh` has removed them
    trainer = Run(recipe, run_dir, report)
    trainer.lock = lock
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        report({"resume": str(checkpoint)})
        trainer.resume(checkpoint)
    elif state.is_main_process:
        write_atomic(run_dir / "log.jsonl", "")
    return trainer


def run(recipe: Any, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None, fresh: bool = False,
        stop_after: int | None = None, report=print) -> RunResult:  # fmt: skip
    """Train and evaluate a recipe. An existing run directory with checkpoints is resumed unless ``fresh``."""
    from accelerate import PartialState

    if not PartialState(cpu=_on_cpu()).is_main_process:
        report = _quiet  # one process speaks for the run
    trainer = start(recipe, overrides, run_dir=run_dir, fresh=fresh, report=report)
    with trainer:
        report({"total_steps": trainer.recipe.train.steps, "step": trainer.step})
        trainer.fit(stop_after, report)
        if not trainer.done():  # stopped after `stop_after` steps, as an interruption would
            return RunResult(trainer.run_dir, {}, trainer.step, trainer.history, trainer.main)
        metrics = trainer.finish()
    return RunResult(trainer.run_dir, metrics, trainer.step, trainer.history, trainer.main)
