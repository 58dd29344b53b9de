"""What `prefixcap bench` leaves behind: bench.json (figures + where they were measured), bench.md and bench.png."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefixcap.checkpoints import installed_versions

# (key, what the table calls it, format); the order of the table's rows, after the data's headline metric.
COLUMNS: list[tuple[str, str, str]] = [
    ("clip_s", "CLIP-S (test)", "{:.4f}"),
    ("ref_clip_s", "RefCLIP-S (test)", "{:.4f}"),
    ("cider", "CIDEr (test)", "{:.3f}"),
    ("bleu4", "BLEU-4 (test)", "{:.3f}"),
    ("time_to_target_s", "train s to target", "{:.1f}"),
    ("steps_to_target", "steps to target", "{:d}"),
    ("train_samples_per_s", "train samples/s (data excluded)", "{:.0f}"),
    ("train_samples_per_s_with_data", "train samples/s (data included)", "{:.0f}"),
    ("caption_images_per_s_b1", "caption images/s, batch 1", "{:.1f}"),
    ("caption_images_per_s_batch", "caption images/s, batch N", "{:.1f}"),
    ("caption_latency_p50_ms", "caption latency p50 ms", "{:.1f}"),
    ("caption_latency_p95_ms", "caption latency p95 ms", "{:.1f}"),
    ("peak_train_memory_mb", "peak training memory MiB", "{:.0f}"),
    ("total_params", "parameters", "{:,}"),
    ("trainable_params", "trainable parameters", "{:,}"),
    ("checkpoint_mb", "checkpoint MiB", "{:.2f}"),
    ("steps", "steps trained", "{:d}"),
    ("train_seconds", "train s (steps only)", "{:.1f}"),
    ("setup_seconds", "setup s (data, feature cache)", "{:.1f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
]


# The matching section's rows (prefixcap.retrieval's figures), one column per entry and score type.
MATCHING_ROWS: list[tuple[str, str]] = [
    ("i2t_r1", "image->text R@1"),
    ("i2t_r5", "image->text R@5"),
    ("t2i_r1", "text->image R@1"),
    ("t2i_r5", "text->image R@5"),
    ("hard_negative_accuracy", "hard-negative accuracy"),
]


def environment(device: str) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    dists = ("prefixcap", "torch", "transformers", "peft", "accelerate", "onnxruntime")
    found = installed_versions(dists)
    versions = {dist: found.get(dist, "not installed") for dist in dists}
    return {"machine": {**machine(), "torch_threads": torch.get_num_threads()}, "device": {"type": device, "name": name},
            "versions": versions, "git_revision": git_revision()}  # fmt: skip


def machine() -> dict[str, Any]:
    """What a CPU figure was measured on (benchmarks/ scripts record it too)."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
            "cores": os.cpu_count()}  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """The checkout prefixcap runs from, "-dirty" when it has uncommitted changes; figures name the code they measured."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (prefixcap is not running from a git checkout)"
    return rev.stdout.strip() + ("-dirty" if dirty else "")


def ratios(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each later entry's figures divided by the first entry's."""
    base = entries[0]["values"]
    out = {}
    for e in entries[1:]:
        out[e["label"]] = {k: v / base[k] for k, v in e["values"].items()
                           if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float)) and base[k]}
    return out


def cell(entry: dict[str, Any], key: str, fmt: str) -> str:
    value = entry["values"].get(key)
    if value is None:
        return f"n/a: {entry['why'].get(key, 'not measured')}"
    return fmt.format(int(value) if fmt.endswith("d}") or fmt == "{:,}" else value)


def columns(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """COLUMNS, led by the headline metric the data declared (bench.json's protocol.headline), if any."""
    headline = report["protocol"].get("headline")
    return ([(headline["name"], f"{headline['label']} (test)", "{:.3f}")] if headline else []) + COLUMNS


def rows(report: dict[str, Any]) -> list[list[str]]:
    """The table: one row per figure, one column per entry; later entries show their ratio to the first."""
    entries, rel = report["entries"], report["ratios"]
    table = []
    for key, label, fmt in columns(report):
        row = [label]
        for e in entries:
            text = cell(e, key, fmt)
            if e["label"] in rel and key in rel[e["label"]]:
                text += f" ({rel[e['label']][key]:.2f}x)"
            row.append(text)
        table.append(row)
    return table


def matching(entries: list[tuple[str, dict[str, Any]]], clip_model: str | None) -> dict[str, Any]:
    """bench.json's matching section from each entry's measure_matching(): the set's facts (the same for every
    entry: one split, one protocol), one column per entry and score type, and the reference CLIP's column last."""
    first = entries[0][1]
    facts = {k: v for k, v in first.items() if k not in ("scores", "why", "reference", "seconds")}
    no_negatives = first.get("why_no_hard_negatives")
    columns = [_column(label, kind, values, found["why"].get(kind), no_negatives)
               for label, found in entries for kind, values in found["scores"].items()]  # fmt: skip
    if reference := first.get("reference"):
        columns.append(_column(reference["model"], "cosine", reference["scores"], None, no_negatives, True))
    else:
        why = "eval.clip_model is null" if clip_model is None else next(iter(first["why"].values()), "not measured")
        columns.append(_column("CLIP", "cosine", None, why, no_negatives, True))
    seconds = {label: found["seconds"] for label, found in entries if "seconds" in found}
    return {**facts, "seconds": seconds, "columns": columns}


def _column(label: str, kind: str, values: dict[str, Any] | None, why: str | None, no_negatives: str | None,
            reference: bool = False) -> dict[str, Any]:  # fmt: skip
    """One column: a value for each MATCHING_ROWS key, or the reason in ``why``: a figure is never a silent gap."""
    values = {key: (values or {}).get(key) for key, _ in MATCHING_ROWS}
    reasons = {key: why or (no_negatives if key == "hard_negative_accuracy" else None) or "not measured"
               for key, value in values.items() if value is None}  # fmt: skip
    return {"label": label, "score": kind, "reference": reference, "values": values, "why": reasons}


# The pointing section's rows (prefixcap.pointing's figures), one column per entry.
POINTING_ROWS = [("attention", "attention"), ("gradient", "gradient"),
                 ("attention_without_rollout", "attention, no rollout"),
                 ("gradient_without_rollout", "gradient, no rollout"), ("chance", "chance (box area)"),
                 ("centre", "centre of the image")]  # fmt: skip


def pointing(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """bench.json's pointing section from each entry's measure_pointing(): one column per entry, each figure or why
    it has none."""
    columns = []
    for label, found in entries:
        values = {**{m: v for m, v in found.get("accuracy", {}).items()},
                  **{f"{m}_without_rollout": v for m, v in found.get("accuracy_without_rollout", {}).items()},
                  "chance": found.get("chance"), "centre": found.get("centre")}  # fmt: skip
        per_method = found.get("why") if isinstance(found.get("why"), dict) else {}
        general = found.get("why") if isinstance(found.get("why"), str) else None
        if general is None and not found.get("words") and per_method:  # no right caption: one reason for every row
            general = next(iter(per_method.values()))
        why = {key: general or per_method.get(key.removesuffix("_without_rollout")) or "not measured"
               for key, _ in POINTING_ROWS if values.get(key) is None}  # fmt: skip
        facts = {k: found[k] for k in ("split", "images", "correct_captions", "words", "attention_by_layer", "seconds")
                 if k in found}  # fmt: skip
        columns.append({"label": label, "values": {k: values.get(k) for k, _ in POINTING_ROWS}, "why": why, **facts})
    return {"columns": columns}


def pointing_table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The pointing figures as (column headers, rows), for bench.md and the CLI."""
    columns = section["columns"]
    body = [[label, *(f"{c['values'][key]:.3f}" if c["values"][key] is not None else f"n/a: {c['why'][key]}"
                      for c in columns)] for key, label in POINTING_ROWS]  # fmt: skip
    body.append(["words placed (correct captions)", *(f"{c['words']} ({c['correct_captions']})" if "words" in c
                                                      else "n/a" for c in columns)])  # fmt: skip
    return [c["label"] for c in columns], body


def pointing_markdown(section: dict[str, Any]) -> list[str]:
    columns = section["columns"]
    measured = next((c for c in columns if "images" in c), None)
    if measured is None:
        return ["", "### Pointing game", "", f"n/a: {columns[0]['why'].get('attention', 'not measured')}"]
    lines = [
        "", "### Pointing game", "",
        f"On the first {measured['images']} held-out ({measured['split']}) images: for each word the data set can "
        "place in a correct greedy caption (shapes: each shape's noun), whether its map's peak falls inside that "
        "shape's box (docs/explain.md). Chance is the box's share of the image; centre points at the image's centre.",
        "",
    ]  # fmt: skip
    return lines + _markdown_table(*pointing_table(section))


def matching_markdown(section: dict[str, Any]) -> list[str]:
    """bench.md's matching table: rows are the figures, columns entry x score type, the reference CLIP last."""
    columns = section["columns"]
    if "images" not in section:  # no held-out images: every column says why
        return ["", "### Matching: retrieval and hard negatives", "", f"n/a: {columns[0]['why']['i2t_r1']}"]
    negatives = (f"each image's caption against its {section['negatives_per_image']:.1f} hard negatives on average "
                 f"(minimal edits: one colour, one shape or the order changed; {section['hard_negative_images']} "
                 "images)" if section["negatives_per_image"] is not None
                 else f"no hard negatives: {section['why_no_hard_negatives']}")  # fmt: skip
    lines = [
        "", "### Matching: retrieval and hard negatives", "",
        f"On the first {section['images']} held-out ({section['split']}) images and their {section['captions']} "
        f"distinct captions (first references; images that share a caption all count as right), {negatives}. "
        "Ties count as misses. The reference column is the data's CLIPScore model, by the cosine of its own "
        "embeddings.",
        "",
    ]  # fmt: skip
    return lines + _markdown_table(*matching_table(section))


def _markdown_table(headers: list[str], body: list[list[str]]) -> list[str]:
    """A markdown table: an empty corner, ``headers`` across the top, each row a label then its cells."""
    lines = ["| | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def matching_table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The matching figures as (column headers, rows: a label then one cell per column), for bench.md and the CLI."""
    columns = section["columns"]
    headers = [f"{c['label']} {c['score']}" + (" (reference)" if c["reference"] else "") for c in columns]
    body = [[label, *(f"{c['values'][key]:.3f}" if c["values"][key] is not None else f"n/a: {c['why'][key]}"
                      for c in columns)] for key, label in MATCHING_ROWS]  # fmt: skip
    return headers, body


def markdown(report: dict[str, Any]) -> str:
    env, p = report["environment"], report["protocol"]
    budget = f"{p['steps']} steps" if p["steps"] else f"{p['seconds']:g} s of training"
    lines = [
        f"Measured by `prefixcap bench` on {env['device']['name']} ({env['device']['type']}), "
        f"prefixcap {env['versions']['prefixcap']} at {env['git_revision']}, torch {env['versions']['torch']}.",
        f"Same data ({p['data']['name']}), seed {p['seed']}, batch {p['batch_size']}, budget {budget}; "
        f"ratios in brackets are against {report['entries'][0]['label']}.",
        "",
        "| | " + " | ".join(e["label"] for e in report["entries"]) + " |",
        "|---|" + "---|" * len(report["entries"]),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    if report.get("matching"):
        lines += matching_markdown(report["matching"])
    if report.get("pointing"):
        lines += pointing_markdown(report["pointing"])
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries, headline = report["entries"], report["protocol"].get("headline") or {}
    quality = next((k for k in (headline.get("name"), "clip_s", "cider")
                    if k and all(e["values"].get(k) is not None for e in entries)), None)  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for e in entries:
        x = e["values"]["train_samples_per_s"]
        y = e["values"].get(quality) if quality else 0.0
        left.scatter([x], [y], s=60)
        left.annotate(e["label"], (x, y), textcoords="offset points", xytext=(6, 4))
    left.set_xlim(left=0)
    if quality == headline.get("name") and headline.get("bounds"):
        low, high = headline["bounds"]
        left.set_ylim(low, high + 0.05 * (high - low))
    left.set_xlabel("training samples/s (median, data excluded)")
    left.set_ylabel(f"{quality} (test)" if quality else "no quality metric for every entry")
    left.set_title("quality vs training throughput")
    bars = [("train samples/s", "train_samples_per_s"), ("caption img/s b1", "caption_images_per_s_b1"),
            ("caption img/s bN", "caption_images_per_s_batch")]  # fmt: skip
    width = 0.8 / len(entries)
    for i, e in enumerate(entries):
        right.bar([j + i * width for j in range(len(bars))], [e["values"][k] for _, k in bars], width, label=e["label"])
    right.set_xticks([j + width * (len(entries) - 1) / 2 for j in range(len(bars))], [b for b, _ in bars])
    right.set_yscale("log")
    right.set_title("throughput")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
