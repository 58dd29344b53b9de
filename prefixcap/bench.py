"""`prefixcap bench --compare A,B,...`: train and evaluate several systems under one protocol, measure them alike.

Every entry gets the same data section, seed, batch size, caption length, evaluation set and budget (the same number
of optimiser steps, or the same seconds of training), and they run one after the other in this process, so their
figures are comparable on a noisy machine. An entry is a recipe (file or name) or a system name; a system name
stands for its offline preset on the shapes world, or, when --data is given, for its real-size recipe.

The figure users care about most is time to quality (the prefix-vs-cross-attention claim is about it), so every
entry is evaluated on the validation split every ``eval_every`` steps and the first evaluation that reaches the
target is reported with the training seconds spent until then (evaluation time not counted).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefixcap.errors import PluginError, PrefixcapError
from prefixcap.interfaces import Metric
from prefixcap.pointing import POINTING_IMAGES
from prefixcap.recipe import Recipe, find_recipe, load_recipe

# A system name -> (its offline preset on the shapes world, its real-size recipe, used when --data is given).
PRESETS: dict[str, tuple[str, str]] = {
    "prefix": ("quickstart", "siglip-smollm135"),
    "crossattn": ("quickstart-crossattn", "crossattn-vit-distilgpt2"),
}
SECONDS_MODE_STEPS = 10_000_000  # with a wall-clock budget the step count is unknown: the LR stays flat after warmup
QUALITY = ("clip_s", "ref_clip_s", "cider", "bleu4")  # held-out (test split) metrics of any data, after its headline
# The generative score runs the decoder once per (image, text) pair, so matching costs images x distinct captions
# decoder passes: 100 shapes images have ~80, ~8,000 passes, 6 s per quickstart system on 2 idle CPU cores
# (several times that on busy ones); twice the images is four times the work.
MATCHING_IMAGES = 100


class BenchError(PrefixcapError):
    """The comparison cannot be set up fairly (unknown entry, different image resolutions, bad target, ...)."""


@dataclass(frozen=True)
class Target:
    metric: str  # a validation metric (the data's headline, clip_s, cider, loss, ...)
    value: float
    higher_is_better: bool = True

    @classmethod
    def parse(cls, text: str) -> Target:
        match = re.fullmatch(r"\s*([a-z0-9_]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
        if not match:
            raise BenchError(f"--target {text!r}: expected METRIC>=VALUE or METRIC<=VALUE, e.g. clip_s>=0.7")
        return cls(match[1], float(match[3]), match[2] == ">=")

    def reached(self, value: float) -> bool:
        return value >= self.value if self.higher_is_better else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{'>=' if self.higher_is_better else '<='}{self.value:g}"


@dataclass
class Protocol:
    """What every entry shares."""

    data: dict[str, Any]
    seed: int
    batch_size: int
    steps: int | None  # the step budget, or None with a wall-clock budget
    seconds: float | None
    eval_every: int
    target: Target | None
    max_caption_tokens: int
    max_new_tokens: int
    eval_examples: int | None
    clip_model: str | None
    gen_images: int  # images captioned one at a time for latency; batch-N speed uses 8 batches of validation images
    gen_batch: int  # N of "images/s at batch N" (also the evaluation batch)
    headline: Metric | None = None  # the data's own metric (DatasetSource.headline): first row, default target
    matching_images: int = MATCHING_IMAGES  # held-out images that retrieval and hard negatives are measured on
    pointing_images: int = POINTING_IMAGES  # held-out images the pointing game plays on (prefixcap.pointing)

    def overrides(self) -> dict[str, dict[str, Any]]:
        return {
            "train": {"seed": self.seed, "batch_size": self.batch_size, "max_caption_tokens": self.max_caption_tokens,
                      "steps": self.steps or SECONDS_MODE_STEPS, "max_seconds": self.seconds},
            "eval": {"every_steps": self.eval_every, "max_examples": self.eval_examples, "clip_model": self.clip_model,
                     "batch_size": self.gen_batch},
            "generate": {"max_new_tokens": self.max_new_tokens},
            "output": {"tensorboard": False, "log_every_steps": max(1, self.eval_every)},
        }  # fmt: skip


@dataclass
class Entry:
    label: str
    recipe: Recipe


@dataclass(frozen=True)
class EntryStarted:
    """Reported before an entry trains; its run's own events follow, reported with the entry's label."""

    label: str
    recipe: str


@dataclass
class EntryResult:
    label: str
    recipe: str
    system: str
    values: dict[str, float | int | None]
    why: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value
    data: dict[str, Any] = field(default_factory=dict)  # what it trained on: fingerprint, sizes
    matching: dict[str, Any] = field(default_factory=dict)  # measure_matching(); bench() makes them one section
    pointing: dict[str, Any] = field(default_factory=dict)  # measure_pointing(); bench() makes them one section


# --- setting up ---------------------------------------------------------------------------------------------------


def entry_recipe(name: str, real_data: bool) -> str:
    """A recipe file or name as given; a system name -> its preset."""
    if name in PRESETS and not Path(name).exists():
        return PRESETS[name][1 if real_data else 0]
    try:
        return str(find_recipe(name))
    except PrefixcapError as e:
        raise BenchError(f"--compare entry {name!r} is neither a recipe nor a system with a preset "
                         f"({', '.join(PRESETS)}): {e}") from None  # fmt: skip


def parse_data(spec: str) -> dict[str, Any]:
    """--data: a dataset name (`shapes`), an inline YAML mapping (`{name: hf, path: ...}`), or a recipe whose data
    section is taken."""
    try:
        value = yaml.safe_load(spec)
    except yaml.YAMLError:
        value = None
    if isinstance(value, dict):
        if "name" not in value:
            raise BenchError(f"--data {spec!r}: a data mapping needs a name, e.g. {{name: hf, path: jxie/flickr8k}}")
        return value
    if Path(spec).suffix in (".yaml", ".yml") or Path(spec).exists():
        recipe = load_recipe(spec)
        if recipe.data is None:
            raise BenchError(f"--data {spec}: that recipe has no data section")
        return recipe.to_dict()["data"]
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        return {"name": value}
    raise BenchError(f"--data {spec!r}: give a dataset name, a {{name: ..., ...}} mapping, or a recipe file")


def data_headline(data_section: dict[str, Any]) -> Metric | None:
    """The headline metric the data set declares, read from its registered class (nothing is built or read)."""
    from prefixcap.registry import get_component

    try:
        factory = get_component("dataset", str(data_section.get("name"))).load_factory()
    except PluginError:
        return None  # an unknown name: the recipe check that follows says so, with the file and line
    headline = getattr(factory, "headline", None)
    return headline if isinstance(headline, Metric) else None


def default_target(headline: Metric | None) -> Target | None:
    """Without --target, time the data's own headline metric to the target it declares."""
    if headline is None or headline.target is None:
        return None
    return Target(headline.name, headline.target, headline.higher_is_better)


def plan(compare: Sequence[str], *, data: str | None = None, steps: int | None = None, seconds: float | None = None,
         seed: int | None = None, batch_size: int | None = None, eval_every: int | None = None,
         target: str | None = None, gen_images: int = 32, matching_images: int = MATCHING_IMAGES,
         pointing_images: int = POINTING_IMAGES, overrides: Sequence[str] = ()) -> tuple[Protocol, list[Entry]]:  # fmt: skip
    """Resolve the entries and the protocol they share; checked before anything trains."""
    names = [n.strip() for n in compare if n.strip()]
    if not names:
        raise BenchError("--compare needs at least one entry, e.g. --compare crossattn,prefix")
    if steps is not None and seconds is not None:
        raise BenchError("give one budget: --steps or --seconds, not both")
    if matching_images < 1:
        raise BenchError(f"matching_images is {matching_images}: matching needs at least one held-out image")
    if pointing_images < 1:
        raise BenchError(f"pointing_images is {pointing_images}: the pointing game needs at least one held-out image")
    own = [load_recipe(entry_recipe(n, data is not None)) for n in names]  # errors point at each entry's file
    first = own[0]
    data_section = parse_data(data) if data is not None else first.to_dict().get("data")
    if data_section is None:
        raise BenchError(f"{first.source}: no data section; give --data (e.g. --data shapes)")
    steps = steps if steps is not None or seconds is not None else first.train.steps
    headline = data_headline(data_section)
    protocol = Protocol(
        data=data_section, seed=first.train.seed if seed is None else seed,
        batch_size=batch_size or first.train.batch_size, steps=steps, seconds=seconds,
        eval_every=eval_every or first.eval.every_steps or max(1, (steps or 1000) // 10),
        target=Target.parse(target) if target else default_target(headline),
        max_caption_tokens=first.train.max_caption_tokens, max_new_tokens=first.generate.max_new_tokens,
        eval_examples=first.eval.max_examples, clip_model=first.eval.clip_model, gen_images=gen_images,
        gen_batch=first.eval.batch_size, headline=headline, matching_images=matching_images,
        pointing_images=pointing_images,
    )  # fmt: skip
    entries, labels = [], set()
    for name, recipe in zip(names, own):
        spec = recipe.to_dict()
        spec["data"] = protocol.data
        for section, values in protocol.overrides().items():
            spec[section] = {**spec.get(section, {}), **values}
        label = Path(name).stem if name.endswith((".yaml", ".yml")) else name
        while label in labels:
            label += "'"
        labels.add(label)
        entries.append(Entry(label, load_recipe(spec, overrides, origin=recipe)))  # messages name the entry's file
    protocol.data = entries[0].recipe.to_dict()["data"]  # as --set left it, the same for every entry
    _check_resolution(entries)
    return protocol, entries


def _check_resolution(entries: list[Entry]) -> None:
    """One image resolution for all: a system that sees more pixels would win or lose for that reason alone."""
    from prefixcap.compose import compose

    sizes = {e.label: compose(e.recipe, pretrained=False).encoder.preprocessing.size for e in entries}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k} {v} px" for k, v in sizes.items())
        raise BenchError(f"the entries see images at different resolutions ({shown}); a fair comparison needs "
                         "one: choose encoders with the same input size")  # fmt: skip


# --- measuring ----------------------------------------------------------------------------------------------------


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory while the block runs: CUDA's max allocated bytes, or on the CPU the process's resident set size,
    sampled every 10 ms (the kernel's own peak, ru_maxrss, never goes down, so it would carry earlier entries')."""
    import torch

    found: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield found
        found.update(mb=torch.cuda.max_memory_allocated() / 2**20, kind="cuda max allocated")
        return
    page, stop, peak = os.sysconf("SC_PAGE_SIZE"), threading.Event(), [0]

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * page)
            if stop.wait(0.01):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()
    found.update(mb=peak[0] / 2**20, kind="peak RSS")


def median_rates(step_times: Sequence[tuple[float, float]], samples: int) -> tuple[float, float, int]:
    """Training samples/s, median over steps after warm-up: (data loading excluded, included, steps timed)."""
    warm = min(max(3, len(step_times) // 10), len(step_times) - 1)
    timed = step_times[warm:]
    compute = statistics.median(samples / c for _, c in timed)
    total = statistics.median(samples / (d + c) for d, c in timed)
    return compute, total, len(timed)


def caption_speed(system, pixels, config, gen_images: int, batch: int) -> dict[str, float]:
    """Images/s at batch 1 (with p50/p95 latency per caption) and at batch ``batch``, pixels in, captions out."""
    import torch

    device = next(system.parameters()).device
    system.eval()
    system.generate(pixels[:batch].to(device), config)  # warm-up: first-call allocations and kernel selection
    latencies = []
    for i in range(min(gen_images, len(pixels))):
        tic = time.perf_counter()
        system.generate(pixels[i : i + 1].to(device), config)  # returns strings: the work is done when it returns
        latencies.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    for i in range(0, len(pixels), batch):
        system.generate(pixels[i : i + batch].to(device), config)
    batched = len(pixels) / (time.perf_counter() - tic)
    p50, p95 = (float(torch.tensor(latencies).quantile(q)) * 1000 for q in (0.5, 0.95))
    return {"caption_images_per_s_b1": len(latencies) / sum(latencies), "caption_images_per_s_batch": batched,
            "caption_latency_p50_ms": p50, "caption_latency_p95_ms": p95}  # fmt: skip


def time_to_target(history: list[dict[str, Any]], target: Target) -> tuple[dict[str, float | None], str | None]:
    evals = [r for r in history if target.metric in r.get("val", {})]
    if not evals:
        return {"time_to_target_s": None, "steps_to_target": None}, f"no validation {target.metric} was computed"
    for row in evals:
        if target.reached(row["val"][target.metric]):
            return {"time_to_target_s": row["train_s"], "steps_to_target": row["step"]}, None
    pick = max if target.higher_is_better else min
    best = pick(evals, key=lambda r: r["val"][target.metric])
    return {"time_to_target_s": None, "steps_to_target": None}, (
        f"not reached in {history[-1]['step']} steps (best {best['val'][target.metric]:.3g}, step {best['step']})")


def quality_keys(headline: Metric | None) -> list[str]:
    return [*([headline.name] if headline else []), *QUALITY]


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run_entry(entry: Entry, protocol: Protocol, out: Path, report: Callable[[Any], None],
              reference: bool = False) -> EntryResult:  # fmt: skip
    """Train and measure one entry; ``reference``: also measure the data's CLIPScore model's matching figures."""
    from prefixcap.training import start

    tic = time.perf_counter()
    trainer = start(entry.recipe, run_dir=out / entry.label, fresh=True, report=report, check_files=False)
    setup = time.perf_counter() - tic
    device = trainer.accelerator.device.type
    with trainer:  # releases the run directory's lock
        with peak_memory(device) as memory:
            trainer.fit(report=report)
        metrics = trainer.finish()
    t = entry.recipe.train
    compute, total, timed = median_rates(trainer.step_times, t.batch_size * t.grad_accum)
    total_params, trainable = trainer.system.parameter_counts()
    values: dict[str, Any] = {}
    why: dict[str, str] = {}
    for name in quality_keys(protocol.headline):
        values[name] = metrics.get(f"test_{name}", metrics.get(f"val_{name}"))
        if values[name] is None:
            why[name] = "eval.clip_model is null" if "clip" in name else "not computed"
    values.update(train_samples_per_s=compute, train_samples_per_s_with_data=total, timed_steps=timed)
    pixels = trainer.pixels(trainer.val_split, max(protocol.gen_images, 8 * protocol.gen_batch))
    values.update(caption_speed(trainer.system, pixels, entry.recipe.generate,
                                protocol.gen_images, protocol.gen_batch))  # fmt: skip
    values.update(peak_train_memory_mb=memory["mb"], total_params=total_params, trainable_params=trainable,
                  checkpoint_mb=_dir_mb(trainer.run_dir / "final"), steps=trainer.step,
                  train_seconds=trainer.train_seconds, setup_seconds=setup,
                  wall_seconds=time.perf_counter() - tic)  # fmt: skip
    if protocol.target is None:
        values.update(time_to_target_s=None, steps_to_target=None)
        why["time_to_target_s"] = why["steps_to_target"] = "no --target given"
    else:
        found, reason = time_to_target(trainer.history, protocol.target)
        values.update(found)
        if reason:
            why["time_to_target_s"] = why["steps_to_target"] = reason
    data = {"fingerprint": trainer.data_seen.hexdigest(), "train_examples": len(trainer.train_split),
            "val_examples": len(trainer.val_split), "seed": t.seed, "batch_size": t.batch_size,
            "skipped_images": metrics["skipped_images"], "memory": memory["kind"]}  # fmt: skip
    from prefixcap.matching import measure_matching

    matching = measure_matching(trainer.system, trainer.source, protocol.matching_images,
                                trainer.scorer if reference else None)  # fmt: skip
    from prefixcap.pointing import measure_pointing

    pointing = measure_pointing(trainer.system, trainer.source, protocol.pointing_images)
    return EntryResult(entry.label, entry.recipe.source, entry.recipe.system.name, values, why, data, matching,
                       pointing)  # fmt: skip


# --- the comparison -----------------------------------------------------------------------------------------------


def bench(compare: Sequence[str], *, out: str | Path = "bench", report: Callable[[Any, str | None], None] | None = None,
          **options: Any) -> dict[str, Any]:  # fmt: skip
    """Run the comparison (options: see ``plan``); write bench.json, bench.md and bench.png under ``out``.
    ``report(event, entry_label)`` receives EntryStarted and each entry's run events (prefixcap.training.events).

    Returns the report that bench.json holds: environment, protocol, entries (figures, and why any is missing),
    and each later entry's ratios to the first."""
    from dataclasses import asdict

    from prefixcap import bench_report

    from prefixcap.doctor import check, preflight

    protocol, entries = plan(compare, **options)
    say = report or (lambda event, entry: None)
    # Every entry's weights and data before the bench directory exists: one error lists all that is missing.
    preflight([check(entry.recipe) for entry in entries], lambda event: say(event, None), BenchError)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot write the bench directory {out}: {e.strerror or e}") from None
    results = []
    for i, entry in enumerate(entries):
        say(EntryStarted(entry.label, entry.recipe.source), entry.label)
        # The reference CLIP sees the same held-out images whichever entry measures it: the first does.
        done = run_entry(entry, protocol, out, lambda event, label=entry.label: say(event, label), reference=i == 0)
        results.append(asdict(done))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    protocol_dict = {**asdict(protocol), "target": str(protocol.target) if protocol.target else None}
    protocol_dict = json.loads(json.dumps(protocol_dict))  # as bench.json holds it (the headline's bounds a list)
    matching = bench_report.matching([(r["label"], r.pop("matching")) for r in results], protocol.clip_model)
    pointing = bench_report.pointing([(r["label"], r.pop("pointing")) for r in results])
    result = {"environment": bench_report.environment(device), "protocol": protocol_dict, "entries": results,
              "ratios": bench_report.ratios(results), "matching": matching, "pointing": pointing}  # fmt: skip
    result["files"] = {k: str(v) for k, v in bench_report.write(result, out).items()}
    return result
