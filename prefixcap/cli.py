"""The `prefixcap` command: parses, calls the Python API, prints with rich. Nothing else lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import textwrap
from functools import wraps
from pathlib import Path

import click
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from prefixcap import __version__
from prefixcap.errors import PrefixcapError, summary
from prefixcap.registry import KINDS, list_components, registry
from prefixcap.yaml_text import printable

out = Console()
err = Console(stderr=True)


def _errors_to_exit_2(fn):
    """Domain errors are the user's to fix: one clear message, exit code 2, no traceback.

    PREFIXCAP_DEBUG=1 shows the traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrefixcapError as e:
            if os.environ.get("PREFIXCAP_DEBUG"):
                raise
            lines = str(e).splitlines() or [type(e).__name__]
            err.print(f"[bold red]error:[/] {_shown(lines[0])}", markup=True, highlight=False, soft_wrap=True)
            for line in lines[1:]:
                err.print(f"       {printable(line)}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(getattr(e, "exit_code", 2))  # an interrupted run exits as the signal's default would

    return wrapper


set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a recipe value, e.g. --set train.lr=3e-4 (repeatable; VALUE is parsed as YAML).",
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefixcap")
def cli():
    """prefixcap: train, compare and ship small image-captioning models for alt text.

    Recipes (YAML) name registered components; plugins add components through the `prefixcap` entry-point group.
    """


@cli.command()
@click.option("--kind", type=click.Choice(KINDS), help="Only components of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@_errors_to_exit_2
def plugins(kind: str | None, as_json: bool):
    """List registered components (builtins and installed plugins), and plugins that failed to load.

    Exit code 0 when every plugin loaded, 1 when one is broken (each is listed, with its error)."""
    rows = list_components(kind)
    broken = registry().broken
    if as_json:
        data = {
            "components": [
                {"kind": r.kind, "name": r.name, "distribution": r.provider.dist, "version": r.provider.version,
                 "plugin": r.provider.plugin, "description": r.description, "factory": r.factory}
                for r in rows
            ],
            "broken": [{"distribution": b.provider.dist, "version": b.provider.version, "plugin": b.provider.plugin,
                        "error": b.error} for b in broken],
        }  # fmt: skip
        click.echo(json.dumps(data, indent=2))
        if broken:
            sys.exit(1)
        return
    # Names, versions, descriptions and errors come from third-party code: shown as text, never as rich markup.
    cells = [(r.kind, r.name, r.provider.dist, r.provider.version, r.description) for r in rows]
    cells += [("broken", b.provider.plugin, b.provider.dist, b.provider.version, b.error) for b in broken]
    _print_components([tuple(printable(str(c)) for c in row) for row in cells])
    if broken:
        by_dist: dict[str, list[str]] = {}
        for b in broken:
            dist = " ".join(filter(None, (b.provider.dist, b.provider.version)))
            by_dist.setdefault(dist, []).append(b.provider.plugin)
        names = "; ".join(d + (f" ({', '.join(filter(None, p))})" if any(p) else "") for d, p in by_dist.items())
        them = "it" if len(broken) == 1 else "them"
        err.print(_shown(f"{len(broken)} broken plugin{'s' * (len(broken) != 1)}: {names}. Fix or uninstall {them}, "
                         f"or leave {them} out with PREFIXCAP_LOAD_PLUGINS"), highlight=False, soft_wrap=True)
        sys.exit(1)


def _print_components(cells: list[tuple[str, ...]]) -> None:
    """The plugins listing: (kind, name, distribution, version, description) rows, as a table where it fits, else as
    one block per row. A name is copied into recipes and a distribution into pip, so neither is ever split; the
    table needs their full widths plus room for a description's longest word up to 40 columns (3 columns of border
    and padding per column, and one), and when the terminal is narrower each description goes under its row, wrapped
    at spaces."""
    columns = ("kind", "name", "distribution", "version", "description")
    widest = [max(cell_len(row[i]) for row in [columns, *cells]) for i in range(len(columns))]
    longest_word = max((cell_len(w) for row in cells for w in row[-1].split()), default=0)
    if out.width - sum(widest[:-1]) - 3 * len(columns) - 1 >= max(24, min(longest_word, 40)):
        table = Table(title="prefixcap components", title_justify="left")
        for col in columns[:-1]:
            table.add_column(col, no_wrap=True)
        table.add_column(columns[-1], overflow="fold")  # a "word" over 40 columns (a path, a hash) folds
        for row in cells:
            style = "red" if row[0] == "broken" else None
            table.add_row(*(Text(c, style=style if i in (0, 4) else None) for i, c in enumerate(row)))
        out.print(table)
        return
    out.print("prefixcap components", highlight=False)
    aligned = widest[0] + widest[1] + max(cell_len(f"{row[2]} {row[3]}") for row in cells) + 4 <= out.width
    wrap = functools.partial(textwrap.wrap, width=max(out.width, 20), subsequent_indent="    ", break_long_words=False,
                             break_on_hyphens=False)  # fmt: skip
    for kind, name, dist, version, description in cells:
        style = "red" if kind == "broken" else ""
        # in columns where every row fits, else each row's words wrapped (still never split)
        head = [f"{kind:<{widest[0]}}  {name:<{widest[1]}}  {dist} {version}".rstrip()] if aligned else \
            wrap(f"{kind} {name} {dist} {version}")  # fmt: skip
        for i, line in enumerate(head):
            text = Text(line, style=style)
            text.stylize("bold", 0, len(kind) if i == 0 else 0)
            out.print(text, soft_wrap=True)
        for line in wrap(description, initial_indent="    "):
            out.print(Text(line, style=style), soft_wrap=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@_errors_to_exit_2
def recipes(as_json: bool):
    """List recipes found in $PREFIXCAP_RECIPES, ./recipes and the bundled recipes."""
    from prefixcap.recipe import list_recipes

    found = list_recipes()
    if as_json:
        click.echo(json.dumps([{"name": n, "path": str(p), "description": d} for n, p, d in found], indent=2))
        return
    table = Table(title="prefixcap recipes", title_justify="left")
    for col in ("name", "path", "description"):
        table.add_column(col, overflow="fold")
    for name, path, description in found:  # a recipe is anyone's file: its name and description are text
        table.add_row(_shown(name), _shown(path), _shown(description))
    out.print(table)


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_errors_to_exit_2
def validate(recipe: str, overrides: tuple[str, ...], as_json: bool):
    """Dry-run RECIPE (a path or a name from `prefixcap recipes`): resolve, wire and count, no weights, no training."""
    from prefixcap.compose import validate as validate_recipe

    report = validate_recipe(recipe, overrides)
    if as_json:
        click.echo(json.dumps({
            "recipe": report.recipe.source, "system": report.system, "total_params": report.total,
            "trainable_params": report.trainable, "prefix_tokens": report.prefix_tokens,
            "lora_targets": report.lora_targets,
            "components": [c.__dict__ for c in report.components],
        }, indent=2))  # fmt: skip
        return
    table = Table(title=_shown(f"{report.recipe.source}: system {report.system!r}"), title_justify="left")
    for col, justify in (("section", "left"), ("component", "left"), ("architecture", "left"), ("checkpoint", "left"),
                         ("params", "right"), ("trainable", "right")):  # fmt: skip
        table.add_column(col, justify=justify, overflow="fold")
    for c in report.components:
        table.add_row(*map(_shown, (c.slot, c.name, c.architecture, c.checkpoint or "")), f"{c.total:,}",
                      f"{c.trainable:,}")  # fmt: skip
    table.add_row("[bold]total[/]", "", "", "", f"[bold]{report.total:,}[/]", f"[bold]{report.trainable:,}[/]")
    out.print(table)
    details = []
    if report.prefix_tokens is not None:
        details.append(f"prefix tokens: {report.prefix_tokens}")
    if report.lora_targets:
        details.append(f"LoRA targets: {_shown(', '.join(report.lora_targets))}")
    share = 100 * report.trainable / report.total if report.total else 0.0
    details.append(f"trainable: {share:.2f}%")
    out.print("ok: " + "; ".join(details), highlight=False)
    # validate reads configs only; whether the weights and data are on this machine is doctor's question
    out.print(_shown(f"files not checked: `prefixcap doctor {recipe}` says whether the weights and data it needs "
                     "are on disk"), highlight=False, soft_wrap=True)  # fmt: skip


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_errors_to_exit_2
def doctor(recipe: str, overrides: tuple[str, ...], as_json: bool):
    """Check that everything RECIPE reads from disk is there: models (local, bundled, or in the Hugging Face cache),
    data sets, the CLIPScore model, plugins' packages; print the command that gets each missing one. Nothing is
    loaded or downloaded. Exit code 0 when nothing is missing, 1 otherwise (2: the recipe itself is wrong)."""
    from prefixcap.checkpoints import hub_cache
    from prefixcap.doctor import check

    checkup = check(recipe, overrides)
    if as_json:
        click.echo(json.dumps(checkup.as_dict(), indent=2))
        sys.exit(1 if checkup.missing else 0)
    name = checkup.recipe or "recipe"
    out.print(_shown(f"{name}: {len(checkup.items)} things to read from disk (Hugging Face cache: {hub_cache()})"),
              highlight=False, soft_wrap=True)  # fmt: skip
    for item in checkup.items:
        status = {"present": "ok"}.get(item.status, item.status)
        out.print(_shown(f"  {status:<9} {item.describe()}"), highlight=False, soft_wrap=True)
        if item.found.fix:
            out.print(_shown(f"  {'':<9}   get it: {item.found.fix}"), highlight=False, soft_wrap=True)
    missing = checkup.missing
    if not missing:
        out.print(_shown(f"ok: everything {name} needs is on disk"), highlight=False, soft_wrap=True)
        return
    blocking = checkup.blocking()
    if blocking:
        why = (f"{checkup.offline} is set, so nothing will be downloaded" if checkup.offline
               else "no download would bring some of them")  # fmt: skip
        then = f"`prefixcap run` refuses to start until they are there ({why})"
    else:
        then = ("`prefixcap run` would download them from the hub when it starts (HF_HUB_OFFLINE is not set); "
                "set HF_HUB_OFFLINE=1 to make it refuse instead")  # fmt: skip
    out.print(_shown(f"missing: {len(missing)} of {len(checkup.items)}; {then}"), highlight=False, soft_wrap=True)
    sys.exit(1)


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--out", "run_dir", type=click.Path(file_okay=False), help="Run directory (default: output.dir).")
@click.option("--fresh", is_flag=True, help="Start over even if the run directory holds checkpoints.")
@_errors_to_exit_2
def run(recipe: str, overrides: tuple[str, ...], run_dir: str | None, fresh: bool):
    """Train RECIPE and evaluate it; an interrupted run resumes from its last checkpoint when run again."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefixcap.data.cache import BuildReport
    from prefixcap.doctor import WillDownload
    from prefixcap.training import Evaluated, Resumed, Started, Stepped, Stopped
    from prefixcap.training import run as run_recipe

    _warn_broken_plugins()
    # A live bar on a terminal; plain lines (one per logged step) when stdout is a file or a pipe.
    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeRemainingColumn(), console=out, disable=not out.is_terminal)  # fmt: skip
    task = None

    def report(event: object) -> None:
        nonlocal task
        say = progress.console.print
        match event:
            case Started():
                if event.compiled:  # else a first step of a minute looks like a hang
                    say("train.compile: the first step compiles the system (45 s for the quickstart on 2 cores, "
                        "minutes at real sizes; seconds on later runs, which find its kernels cached)", highlight=False,
                        soft_wrap=True)
                task = progress.add_task("", total=event.total_steps, completed=event.step)
                progress.start()
            case Evaluated():
                say(f"step {event.step:>6}  val {_shown(_metrics_line(event.shown()))}", highlight=False)
            case Stepped():
                line = f"loss {event.loss:.4f}  lr {event.lr:.2e}  {event.samples_per_s:.0f} samples/s"
                if event.data_images_per_s:  # beside the training rate: data slower than training starves it
                    line += f"  data {event.data_images_per_s:.0f} images/s"
                if out.is_terminal and task is not None:
                    progress.update(task, completed=event.step, description=line)
                else:
                    out.print(f"step {event.step:>6}  {line}", highlight=False)
            case BuildReport():
                built = (f"encoded {event.encoded} images in {event.seconds:.1f} s ({event.images_per_s:.0f} "
                         "images/s)" if event.encoded else "complete, reused")  # fmt: skip
                say(f"feature cache {_shown(event.directory)}: {event.rows} images, {event.nbytes / 2**20:.1f} MiB "
                    f"{event.dtype}, {built}", highlight=False, soft_wrap=True)  # fmt: skip
            case Resumed():
                say(f"resume: {_shown(event.checkpoint)}", highlight=False, soft_wrap=True)
            case Stopped():
                say(f"step {event.step:>6}  early stop: {_shown(event.reason)}", highlight=False)
            case WillDownload():
                _say_downloads(event)

    try:
        result = run_recipe(recipe, overrides, run_dir=run_dir, fresh=fresh, report=report)
    finally:
        progress.stop()
    if not result.main_process:
        return  # one process of a data-parallel launch speaks for the run
    table = Table(title=f"{_shown(result.run_dir)}: {result.steps} steps", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(_shown(key), f"{value:.4g}" if isinstance(value, float) else _shown(value))
    out.print(table)


@cli.command()
@click.option("--compare", required=True, metavar="A,B,...",
              help="Systems (prefix, crossattn: their presets) or recipe files/names, comma-separated; the first "
                   "is the reference for ratios.")
@click.option("--data", help="Data for every entry: a dataset name, a YAML mapping such as '{name: hf, path: ...}', "
                             "or a recipe whose data section is used. Default: the first entry's (shapes for presets).")
@click.option("--steps", type=click.IntRange(min=1), help="Budget: optimiser steps (default: the first entry's).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True),
              help="Budget: seconds of training steps instead of a step count.")
@click.option("--seed", type=int, help="Seed for every entry (default: the first entry's).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Training batch for every entry (default: the first's).")
@click.option("--eval-every", type=click.IntRange(min=1), help="Steps between validation runs (time to target).")
@click.option("--target", help="Quality to time, e.g. clip_s>=0.7 (default: the target the data declares for its "
                               "headline metric, if it declares one).")
@click.option("--gen-images", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images captioned one at a time for the batch-1 speed and latency.")
@click.option("--matching-images", type=click.IntRange(min=1), default=100, show_default=True,
              help="Held-out images retrieval and hard negatives are measured on (each scored against every "
                   "distinct caption among them: the cost grows with the square).")
@click.option("--pointing-images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Held-out images the pointing game plays on (docs/explain.md).")
@set_option
@click.option("--out", "out_dir", default="bench", show_default=True, type=click.Path(file_okay=False),
              help="Where the runs, bench.json, bench.md and bench.png go.")
@_errors_to_exit_2
def bench(compare: str, overrides: tuple[str, ...], out_dir: str, **options):
    """Train and evaluate several systems on the same data, seed and budget, and compare quality, speed and memory.

    --set overrides apply to every entry (e.g. --set data.train_size=2000)."""
    from prefixcap.bench import bench as run_bench
    from prefixcap.bench_report import matching_table, pointing_table, rows

    from prefixcap.bench import EntryStarted
    from prefixcap.doctor import WillDownload
    from prefixcap.training import Evaluated

    def report(event: object, entry: str | None = None) -> None:
        if isinstance(event, WillDownload):
            _say_downloads(event)
        elif isinstance(event, EntryStarted):
            out.rule(_shown(f"{event.label}  ({event.recipe})"))
        elif isinstance(event, Evaluated):
            out.print(printable(f"{entry}: step {event.step:>6}  val {_metrics_line(event.shown())}"), markup=False,
                      highlight=False)  # fmt: skip

    _warn_broken_plugins()
    result = run_bench(compare.split(","), out=out_dir, overrides=overrides, report=report, **options)
    p, env = result["protocol"], result["environment"]
    budget = f"{p['steps']} steps" if p["steps"] else f"{p['seconds']:g} s"
    title = (f"bench on {env['device']['name']}: data {p['data']['name']}, seed {p['seed']}, batch {p['batch_size']}, "
             f"{budget}, N={p['gen_batch']}")  # fmt: skip
    # labels and metric names come from recipes and plugins: every cell is shown escaped
    out.print(_figures_table(title, [e["label"] for e in result["entries"]], rows(result)))
    if "images" in (matching := result.get("matching") or {}):
        title = f"matching on {matching['images']} held-out images (docs/scoring.md)"
        out.print(_figures_table(title, *matching_table(matching)))
    if any("images" in c for c in (result.get("pointing") or {}).get("columns", [])):
        out.print(_figures_table("pointing game: share of shape words whose map peaks in the shape (docs/explain.md)",
                                 *pointing_table(result["pointing"])))  # fmt: skip
    out.print(_shown(f"wrote {', '.join(result['files'].values())}"), highlight=False)


def _figures_table(title: str, columns: list[str], body: list[list[str]]) -> Table:
    """A row label, then one right-aligned column of figures per entry."""
    table = Table(title=_shown(title), title_justify="left")
    table.add_column("")
    for column in columns:
        table.add_column(_shown(column), justify="right", overflow="fold")
    for row in body:
        table.add_row(*map(_shown, row))
    return table


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="RUN_OR_CHECKPOINT PATH...")
@click.option("--onnx", "onnx_dir", type=click.Path(exists=True, file_okay=False),
              help="Caption with this ONNX export (greedy only); then there is no RUN_OR_CHECKPOINT.")
@click.option("--int8", is_flag=True, help="With --onnx: the int8 graphs (written by `prefixcap export --int8`).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "text"]), default="jsonl", show_default=True,
              help="Rows as JSON lines, CSV with a header, or PATH<TAB>CAPTION lines (paths escaped: \\\\ \\t \\n "
                   "\\r \\xNN).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Write the rows to FILE, not stdout: whole, once all are written (never one of the images).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per model call.")
@click.option("--resize", type=click.Choice(["squash", "crop", "letterbox"]),
              help="Resize images so (letterbox: whole, padded to a square; docs/data.md) instead of as the system "
                   "was trained (default).")  # fmt: skip
@click.option("--lang", metavar="TAG", help="Caption in this language: one of the system's language adapters (de, "
                                             "fr, ...: a wrong one is told those it has); default English, its own.")
@click.option("--beams", type=click.IntRange(min=1), metavar="K", help="Beam search with K beams.")
@click.option("--sample", is_flag=True, help="Sample captions instead of searching for the likeliest.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), metavar="P", help="With --sample: nucleus P.")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), metavar="T", help="With --sample.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), metavar="N", help="Longest caption, in tokens.")
@click.option("--tidy/--raw", default=True, show_default=True,
              help="Tidy captions into alt text (no leading 'an image of', capital first, full stop) or leave them.")
@click.option("--max-chars", type=click.IntRange(min=2), default=125, show_default=True, metavar="N",
              help="With --tidy: cut longer captions at a word boundary.")
@click.option("--score", is_flag=True, help="Add each caption's CLIP-S (with the run's eval.clip_model).")
@click.option("--clip-model", metavar="NAME", help="The CLIPScore model for --score (implies it): a transformers "
                                                   "CLIP/SigLIP id or directory, or open_clip:<model>/<tag>.")
@click.option("--rerank", type=click.IntRange(min=1), metavar="K",
              help="Write K candidates (the greedy caption and K-1 sampled) and keep the one the system scores best; "
                   "adds each caption's score to its row.")
@click.option("--min-score", metavar="S|auto",
              help="Mark a caption whose score is below S as unsure in its row (auto: the default the run calibrated: "
                   "95% of held-out reference captions reach it; see docs/scoring.md).")
@click.option("--rank-by", type=click.Choice(["auto", "generative", "contrastive", "likelihood"]),
              help="What --rerank keeps the best of (auto: likelihood + contrastive score); generative or contrastive "
                   "is also the score --min-score compares (otherwise contrastive when the system learnt one).")
@_errors_to_exit_2
def caption(args: tuple[str, ...], onnx_dir: str | None, int8: bool, fmt: str, out_file: str | None, batch_size: int,
            resize: str | None, lang: str | None, beams: int | None, sample: bool, top_p: float | None,
            temperature: float | None, max_new_tokens: int | None, tidy: bool, max_chars: int, score: bool,
            clip_model: str | None, rerank: int | None, min_score: str | None, rank_by: str | None):
    """Write alt text for images with a trained system.

    RUN_OR_CHECKPOINT is a run directory (its final/), a saved system, or the hub id (user/repo) of one pushed to
    the model hub (downloaded once, then read from the hub's cache; a local directory of that name wins). Each PATH
    is an image file, a folder (searched recursively), a glob pattern (** recursive), or - to read paths from stdin,
    one a line. Every image gets a row, with an error instead of a caption when it cannot be read or captioned; the
    others go on. Generation options default to the recipe's generate section. Exit code 0 when every image was
    captioned, 1 otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from prefixcap.caption import (CaptionError, RowWriter, caption_paths, check_out_file, expand_paths, load_captioner,
                                   load_clip_scorer, out_file_stream)  # fmt: skip

    if onnx_dir is None and len(args) < 2:
        raise click.UsageError("give RUN_OR_CHECKPOINT and at least one PATH (or --onnx DIR and PATHs)")
    if sample and (beams or 1) > 1:
        raise click.UsageError("--beams and --sample exclude each other")
    if not sample and (top_p is not None or temperature is not None):
        raise click.UsageError("--top-p and --temperature apply only with --sample")
    given = {"num_beams": beams, "top_p": top_p, "temperature": temperature, "max_new_tokens": max_new_tokens}
    generate: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    if sample or beams:
        generate["do_sample"] = sample  # --beams asks for a search even where the recipe samples
    if int8 and onnx_dir is None:
        raise click.UsageError("--int8 applies only with --onnx")
    lang = None if lang == "en" else lang
    if lang is not None and (score or clip_model or rerank or min_score):
        # the system's scores (and CLIP-S) were learnt on English text: on a German caption they measure nothing
        raise click.UsageError("--lang captions without scores: --score, --rerank and --min-score read English only")
    paths = _with_stdin(args if onnx_dir is not None else args[1:])
    if out_file is not None:
        check_out_file(out_file, paths)  # before the model loads: a refusal costs nothing
    if onnx_dir is not None:
        if sample or (beams or 1) > 1 or (rerank or 1) > 1:
            raise click.UsageError("--onnx captions greedily: --beams, --sample and --rerank need RUN_OR_CHECKPOINT")
        try:
            from prefixcap.onnx_captioner import OnnxCaptioner
        except ImportError as e:
            raise CaptionError(f"--onnx: cannot load the ONNX captioner: {summary(e)}") from e
        captioner, recipe = OnnxCaptioner(onnx_dir, int8=int8, resize=resize, lang=lang), None
        generate = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    else:
        captioner = load_captioner(args[0])
        recipe = captioner.recipe
        if lang is not None:
            captioner.set_language(lang)
        if resize is not None:  # on the system, so that --rerank and --min-score score the pixels it captions
            processor = captioner.encoder.preprocessing
            captioner.encoder.set_preprocessing(resize, processor.fill if resize == "letterbox" else None)
    scorer = load_clip_scorer(recipe, clip_model) if score or clip_model else None
    judge = _judge(captioner, onnx_dir, rerank, min_score, rank_by)

    # Rows on a terminal show the progress themselves; a bar would only fight them for the screen.
    show_bar = err.is_terminal and (out_file is not None or not sys.stdout.isatty())
    progress = Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, disable=not show_bar,
                        redirect_stdout=False, redirect_stderr=False)  # fmt: skip
    # --out is written beside its name and renamed over it when complete: never half a file, whoever reads it.
    sink = out_file_stream(out_file) if out_file else contextlib.nullcontext(sys.stdout)
    total = failed = unsure = 0
    clip_s: list[float] = []
    with sink as stream, progress:
        writer = RowWriter(stream, fmt, score=scorer is not None, judged=judge is not None)
        task = progress.add_task("caption", total=sum(1 for _ in expand_paths(paths)) if show_bar else None)
        try:
            for row in caption_paths(captioner, paths, batch_size=batch_size, tidy=tidy, max_chars=max_chars,
                                     scorer=scorer, judge=judge, **generate):  # fmt: skip
                writer.write(row)
                progress.advance(task)
                total, failed = total + 1, failed + (row.error is not None)
                clip_s += [row.clip_s] if row.clip_s is not None else []
                unsure += bool(row.unsure)
        except BrokenPipeError:  # `prefixcap caption ... | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting flushes nowhere, quietly
            sys.exit(141)  # as a shell reports a process SIGPIPE ended
    summary_line = f"captioned {total - failed} of {total} image{'s' * (total != 1)}"
    if failed:
        summary_line += f"; {failed} error{'s' * (failed != 1)}"
    if judge is not None and judge.min_score is not None:
        summary_line += f"; {unsure} unsure ({judge.kind} score below {judge.min_score:.4g})"
    if clip_s:
        summary_line += f"; mean CLIP-S {sum(clip_s) / len(clip_s):.4f}"
    err.print(summary_line, markup=False, highlight=False, soft_wrap=True)
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="RUN_OR_CHECKPOINT PATH...")
@click.option("--text", "text_args", multiple=True, metavar="TEXT", help="A text to score (repeatable).")
@click.option("--texts", "texts_file", metavar="FILE", help="A file of texts, one a line (UTF-8); - reads stdin.")
@click.option("--onnx", "onnx_dir", type=click.Path(exists=True, file_okay=False),
              help="Score with this ONNX export, without torch; then there is no RUN_OR_CHECKPOINT.")
@click.option("--int8", is_flag=True, help="With --onnx: the int8 graphs (written by `prefixcap export --int8`).")
@click.option("--kind", type=click.Choice(["all", "generative", "contrastive"]), default="all", show_default=True,
              help="Which scores: both, or one (--format matrix needs one).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "matrix"]), default="jsonl", show_default=True,
              help="A row per (image, text) pair as JSON lines or CSV, or a CSV matrix: a row per image, a column "
                   "per text.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Write the rows to FILE, not stdout: whole, once all are written (never one of the images).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images encoded at once (the texts are read once per such group).")
@click.option("--text-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Texts per model call.")
@_errors_to_exit_2
def score(args: tuple[str, ...], text_args: tuple[str, ...], texts_file: str | None, onnx_dir: str | None, int8: bool,
          kind: str, fmt: str, out_file: str | None, batch_size: int, text_batch: int):
    """Score how well each text matches each image, with the system that writes the captions.

    Two scores (docs/scoring.md): generative, how much likelier the image makes the text (mean log-probability
    per token, minus the same without the image; 0 = no likelier), and contrastive, the cosine of the image and text
    in the space the itc loss learnt (systems trained with it). Higher is better for both. Every pair gets a row;
    an image that cannot be read gets one row with its error, an empty text one row with its own, and the rest are
    scored. PATHs as for `prefixcap caption`. Exit code 0 when every pair was scored, 1 otherwise."""
    from prefixcap.caption import check_out_file, load_captioner, out_file_stream
    from prefixcap.score_rows import ScoreWriter, Texts, score_paths, spooled_stdin

    if onnx_dir is None and len(args) < 2:
        raise click.UsageError("give RUN_OR_CHECKPOINT and at least one PATH (or --onnx DIR and PATHs)")
    if bool(text_args) == bool(texts_file):
        raise click.UsageError("give the texts with --text TEXT (repeatable) or --texts FILE, not both")
    if int8 and onnx_dir is None:
        raise click.UsageError("--int8 applies only with --onnx")
    images = args if onnx_dir is not None else args[1:]
    if texts_file == "-" and "-" in images:
        raise click.UsageError("stdin can give the image paths or the texts, not both")
    paths = _with_stdin(images)
    if out_file is not None:
        check_out_file(out_file, paths)
    with spooled_stdin() if texts_file == "-" else contextlib.nullcontext(texts_file) as texts_path:
        texts = Texts(text_args, Path(texts_path) if texts_path else None)
        if onnx_dir is not None:
            from prefixcap.onnx_scorer import OnnxScorer

            scorer = OnnxScorer(onnx_dir, int8=int8)
        else:
            from prefixcap.score import TorchScorer

            scorer = TorchScorer(load_captioner(args[0]))
        kinds = scorer.kinds if kind == "all" else (kind,)
        sink = out_file_stream(out_file) if out_file else contextlib.nullcontext(sys.stdout)
        pairs = errors = 0
        with sink as stream:
            writer = ScoreWriter(stream, fmt, kinds, texts)
            try:
                for row in score_paths(scorer, paths, texts, kinds=kinds, batch_size=batch_size,
                                       text_batch=text_batch):  # fmt: skip
                    writer.write(row)
                    pairs, errors = pairs + (row.error is None), errors + (row.error is not None)
                writer.close()
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(141)
    line = f"scored {pairs} pair{'s' * (pairs != 1)}"
    if errors:
        line += f"; {errors} error{'s' * (errors != 1)}"
    err.print(line, markup=False, highlight=False, soft_wrap=True)
    sys.exit(1 if errors else 0)


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="RUN_OR_CHECKPOINT PATH...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for each image's NAME.explain.png and NAME.explain.json (made if missing).")
@click.option("--method", type=click.Choice(["attention", "gradient"]), default="attention", show_default=True,
              help="attention: what the decoder reads while writing each word; gradient: gradient x input on the "
                   "encoder's tokens, for any system (see docs/explain.md).")
@click.option("--no-rollout", is_flag=True, help="Leave the encoder's output token i standing for patch i instead of "
                                                 "mapping it back through the encoder's attention (rollout).")
@click.option("--resize", type=click.Choice(["squash", "crop", "letterbox"]),
              help="Preprocess the images this way instead of the system's own resize mode.")
@click.option("--per-layer", is_flag=True, help="Also write each word's map per layer (heads averaged) to the JSON.")
@click.option("--per-head", is_flag=True, help="Also write each word's map per layer and head to the JSON.")
@_errors_to_exit_2
def explain(args: tuple[str, ...], out_dir: str, method: str, no_rollout: bool, resize: str | None, per_layer: bool,
            per_head: bool):  # fmt: skip
    """Where each word of the caption comes from: for every image, its greedy caption and one heatmap per word.

    RUN_OR_CHECKPOINT and PATHs as for `prefixcap caption`. Each image gets NAME.explain.png (the image, then a
    panel per word) and NAME.explain.json (tokens, words, each word's map over the patch grid and its peak). Exit
    code 0 when every image was explained, 1 otherwise."""
    from prefixcap.caption import escape_undecodable, load_captioner
    from prefixcap.explain_render import explain_paths

    if len(args) < 2:
        raise click.UsageError("give RUN_OR_CHECKPOINT and at least one PATH")
    system = load_captioner(args[0])
    total = failed = 0
    for row in explain_paths(system, _with_stdin(args[1:]), out_dir, method=method, resize=resize,
                             rollout=not no_rollout, per_layer=per_layer, per_head=per_head):  # fmt: skip
        total, failed = total + 1, failed + (row.error is not None)
        shown = f"{row.path}: error: {row.error}" if row.error else f"{row.path} -> {row.png}: {row.caption}"
        click.echo(escape_undecodable(shown))  # a file name that is not UTF-8 still prints
    err.print(f"explained {total - failed} of {total} image{'s' * (total != 1)}" + (f"; {failed} error"
              f"{'s' * (failed != 1)}" if failed else ""), markup=False, highlight=False)  # fmt: skip
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("source", metavar="RUN_OR_CHECKPOINT")  # or a hub id: checked by saved_system_dir, not click
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--int8", is_flag=True, help="Also write dynamic-int8 quantised graphs (*.int8.onnx).")
@click.option("--web", is_flag=True, help="Also write a static page that captions images in the browser with "
                                          "onnxruntime-web (int8 graphs unless --web-fp32); serve DIR to use it.")
@click.option("--web-fp32", is_flag=True, help="With --web: write only the fp32 graphs and have the page load them.")
@click.option("--ort-dist", type=click.Path(file_okay=False),
              help="With --web: onnxruntime-web's dist/ folder to copy the runtime from (default: $PREFIXCAP_ORT_DIST, "
                   "else web/node_modules/onnxruntime-web/dist of the source checkout, from `npm ci --prefix web`).")
@_errors_to_exit_2
def export(source: str, out_dir: str, int8: bool, web: bool, web_fp32: bool, ort_dist: str | None):
    """Export a trained system to ONNX: graphs, tokenizer, model card and manifest.json, for `prefixcap caption
    --onnx DIR`. RUN_OR_CHECKPOINT is a run directory, a saved system or its hub id (user/repo).

    Any system that declares its graphs (System.onnx_export: both builtins, LoRA merged); see prefixcap/export.py. With
    --web, DIR is also a static captioning page (prefixcap/web_demo.py): `python -m http.server -d DIR`."""
    if not web and (web_fp32 or ort_dist):
        raise click.UsageError("--web-fp32 and --ort-dist apply only with --web")
    if web_fp32 and int8:
        raise click.UsageError("--web-fp32 writes the fp32 graphs only; leave out --int8")
    if web:
        from prefixcap.web_demo import export_web

        manifest = export_web(source, out_dir, int8=not web_fp32, ort_dist=ort_dist)
    else:
        from prefixcap.export import export_system

        manifest = export_system(source, out_dir, int8=int8)
    table = Table(title=f"{out_dir}: {manifest['system']} system, {manifest['format']}", title_justify="left")
    table.add_column("file")
    table.add_column("MiB", justify="right")
    for name, size in manifest["files"].items():
        table.add_row(name, f"{size / 2**20:.2f}")
    out.print(table)
    if web:
        out.print(f"serve it: python -m http.server -d {out_dir}, then open http://localhost:8000/", highlight=False,
                  soft_wrap=True)


@cli.command()
@click.argument("source", metavar="RUN_OR_DIR")
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", "--branch", "revision", metavar="BRANCH",
              help="Commit to this branch, created from main if new (default: main).")
@click.option("--license", "license_id", metavar="ID", help="Set the model card's license, a hub license id such as "
                                                             "apache-2.0 (prefixcap leaves it unset).")
@click.option("--message", "-m", metavar="TEXT", help="The commit message.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, and upload nothing (no network).")
@_errors_to_exit_2
def push(source: str, repo_id: str, private: bool, revision: str | None, license_id: str | None,
         message: str | None, dry_run: bool):
    """Upload a trained system to the Hugging Face model hub as REPO_ID (namespace/name), with its model card.

    RUN_OR_DIR is a run directory (its final/), a saved system or an export (`prefixcap export`). Every file in it
    goes up (names starting with "." left out, pickles refused), its README.md with the usage examples naming
    REPO_ID (one is written from manifest.json if it has none). The run's metrics are in the card; metrics.json and
    samples.jsonl stay home. Log in first: `hf auth login`, or set HF_TOKEN."""
    from prefixcap.hub import push as push_files
    from prefixcap.hub import upload_plan

    plan = upload_plan(source, repo_id, license=license_id)
    sizes = plan.sizes()
    card = {"folder": "the folder's model card", "written": "a model card written now from manifest.json",
            "": "no model card (an export written before prefixcap wrote them; export again for one)"}[plan.card_origin]
    out.print(_shown(f"{repo_id}: {len(sizes)} files, {sum(sizes.values()) / 2**20:.2f} MiB from {plan.folder}"),
              highlight=False, soft_wrap=True)  # fmt: skip
    out.print(f"README.md: {card}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("MiB", justify="right")
    for name, size in sizes.items():
        table.add_row(_shown(name), f"{size / 2**20:.3f}")
    out.print(table)
    if dry_run:
        out.print("dry run: nothing uploaded", highlight=False)
        return
    url = push_files(plan, private=private, revision=revision, message=message)
    out.print(_shown(f"pushed: {url}"), highlight=False, soft_wrap=True)


def _shown(value: object) -> str:
    """Text from a recipe, a plugin or a file name, ready for rich: control characters escaped (no terminal escape
    sequence, such as clear-screen or a window title, reaches the screen) and markup escaped (shown as written)."""
    return escape(printable(str(value)))


def _warn_broken_plugins() -> None:
    """One line on stderr per plugin that failed to load: a run that then misses its component says "unknown", and a
    run that does not need it still deserves to know."""
    for b in registry().broken:
        err.print(_shown(f"warning: broken plugin {b.origin}: {b.error}"), highlight=False, soft_wrap=True)


def _say_downloads(event) -> None:
    """Online, what run and bench will download before they can start (prefixcap.doctor.WillDownload), on stderr."""
    err.print("not on disk yet, so it will be downloaded (HF_HUB_OFFLINE=1 would refuse instead):", highlight=False)
    for item in event.items:
        err.print(_shown(f"  {item.describe()}"), highlight=False, soft_wrap=True)


def _metrics_line(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _judge(captioner, onnx_dir: str | None, rerank: int | None, min_score: str | None, rank_by: str | None):
    """caption's judge (prefixcap.judge) when --rerank, --min-score or --rank-by ask for one, else None."""
    if rerank is None and min_score is None and rank_by is None:
        return None
    from prefixcap.judge import Judge

    if onnx_dir is not None:
        from prefixcap.onnx_scorer import OnnxScorer

        scorer = OnnxScorer(onnx_dir, captioner=captioner)  # its graphs, int8 or not, opened once
    else:
        from prefixcap.score import TorchScorer

        scorer = TorchScorer(captioner)
    kind = rank_by if rank_by in ("generative", "contrastive") else None
    judge = Judge(scorer, kind=kind, rerank=rerank or 1, rank_by=rank_by or "auto")
    calibration = getattr(scorer, "calibration", None) if onnx_dir else captioner.score_calibration
    if min_score == "auto":
        judge.min_score = Judge.calibrated(calibration, judge.kind)
    elif min_score is not None:
        try:
            judge.min_score = float(min_score)
        except ValueError:
            judge.min_score = math.nan
        if not math.isfinite(judge.min_score):
            raise click.BadParameter(f"{min_score!r} is neither a number nor auto", param_hint="--min-score")
    elif calibration and judge.kind in calibration:  # scores are there anyway: flag with the calibrated default
        judge.min_score = Judge.calibrated(calibration, judge.kind)
    return judge


def _with_stdin(args: tuple[str, ...]) -> list[str]:
    """PATH arguments with - replaced by the paths on stdin, one a line."""
    paths: list[str] = []
    for arg in args:
        if arg != "-":
            paths.append(arg)
            continue
        # Bytes, decoded as the file system decodes names: a name that is not UTF-8 still names its file.
        paths += [os.fsdecode(line.rstrip(b"\r\n")) for line in sys.stdin.buffer if line.strip()]
    return paths


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
