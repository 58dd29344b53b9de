"""Does `prefixcap run` stay flat in memory as the dataset grows? Peak RSS and setup time at several set sizes.

    python benchmarks/data_scale.py [--sizes 2000,20000,50000] [--kinds jsonl,datasets] [--steps 20]
                                    [--real-sizes 500,2000] [--throughput] [--out PATH]

Sets: shapes images (64 px) written as PNG files with a JSON Lines index (``jsonl``), and the same images as a
`datasets` folder written by save_to_disk, images embedded (``datasets``). Per kind and size, two runs of the
quickstart model (``train.steps`` steps), each in its own process: cold (an empty feature cache: every image is
decoded and encoded once) and warm (the cache that run left). Each cell records the peak RSS of the training process
(``ru_maxrss``) and of its largest DataLoader worker, the seconds from start to the first step (``setup_s``), and the
cache's bytes. ``--real-sizes`` does the same with the real recipe's encoder, a SigLIP-B/16 tower with random weights
at 224 px (``recipes/siglip-smollm135.yaml``, a tiny decoder standing in for SmolLM), on the jsonl set.
``--throughput`` trains the quickstart 200 steps from the warm cache and again from pixels, and reports training
samples/s with the data path's time included and excluded (``prefixcap.bench.median_rates``).

Targets (issue 18): the largest set's peak RSS within 1.2x of the smallest's, and training samples/s with the data
path included within 10% of the figure without it. Exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / ".data_scale"  # generated sets and caches (git-ignored; delete freely)
MIB = 2**20


def write_sets(size: int) -> dict[str, Path]:
    """The first ``size`` shapes images as PNG files + a JSONL index, and as a datasets folder (made once each)."""
    from prefixcap.data import ShapesOptions
    from prefixcap.data.shapes import ShapesSource

    root = WORK / f"shapes-{size}"
    index = root / "train.jsonl"
    if not index.exists():
        (root / "images").mkdir(parents=True, exist_ok=True)
        source = ShapesSource(ShapesOptions(train_size=size))
        lines = []
        for i, example in enumerate(source.examples("train")):
            name = f"images/{i:06d}.png"
            example.image.save(root / name)
            lines.append(json.dumps({"image": name, "captions": example.captions}) + "\n")
        val = [line for line in lines[:200]]  # held-out scoring is not what is measured: a fixed small val split
        (root / "val.jsonl").write_text("".join(val))
        tmp = index.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(index)
    folder = root / "hf"
    if not (folder / "dataset_dict.json").exists():
        import datasets

        def rows(path: Path):
            for line in path.open():
                row = json.loads(line)
                yield {"image": str(root / row["image"]), "captions": row["captions"]}

        features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
        splits = {name: datasets.Dataset.from_generator(rows, features=features, gen_kwargs={"path": root / f"{name}.jsonl"},
                                                        cache_dir=str(WORK / "hf-build"))
                  for name in ("train", "val")}  # fmt: skip
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    return {"jsonl": index, "datasets": folder}


def data_overrides(kind: str, sets: dict[str, Path]) -> list[str]:
    if kind == "jsonl":
        return [f"data={json.dumps({'name': 'jsonl', 'train': str(sets['jsonl']), 'val': str(sets['jsonl'].with_name('val.jsonl'))})}"]
    return [f"data={json.dumps({'name': 'hf', 'path': str(sets['datasets']), 'caption_column': 'captions', 'val': 'val', 'test': None})}"]


def cell(recipe: str, overrides: list[str], run_dir: str, steps: int) -> dict[str, Any]:
    """One measured run, in this process (the parent starts one process per cell)."""
    from prefixcap.training import start

    tic = time.perf_counter()
    # fp16: the default cache dtype (the quickstart recipe itself asks for fp32, to keep its numbers exact)
    trainer = start(recipe, [*overrides, f"train.steps={steps}", "eval.clip_model=null", "output.tensorboard=false",
                             "output.log_every_steps=1000", "train.cache_dtype=fp16"], run_dir=run_dir, fresh=True,
                    report=lambda row: None)  # fmt: skip
    setup = time.perf_counter() - tic
    with trainer:
        trainer.fit(report=lambda row: None)
        trained = time.perf_counter() - tic - setup
        cache = trainer.train_split.features
        result = {"train_examples": len(trainer.train_split), "setup_s": round(setup, 2), "train_s": round(trained, 2),
                  "cache_mb": round(cache.nbytes() / MIB, 1) if cache else None,
                  "cache_bytes_per_image": round(cache.nbytes() / cache.rows) if cache else None,
                  "encoded": trainer.cache_report.encoded if trainer.cache_report else None}  # fmt: skip
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_worker_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return result


def run_cell(recipe: str, overrides: list[str], name: str, steps: int, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "PREFIXCAP_CACHE": str(cache)}
    args = [sys.executable, __file__, "--cell", json.dumps([recipe, overrides, str(WORK / "runs" / name), steps])]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def real_encoder() -> Path:
    """A SigLIP-B/16 vision tower at 224 px with random weights, saved once (the cost does not depend on values)."""
    path = WORK / "siglip-b16-random"
    if not (path / "config.json").exists():
        import torch
        from transformers import SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(0)
        config = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, image_size=224, patch_size=16)  # fmt: skip
        SiglipVisionModel(config).save_pretrained(path)
    return path


def throughput(steps: int) -> dict[str, Any]:
    """Quickstart training samples/s with the data path's time included and excluded, from cache and from pixels."""
    from prefixcap.bench import median_rates
    from prefixcap.training import start

    out = {}
    for name, extra in (("cached_features", []), ("pixels", ["train.cache_features=false"])):
        trainer = start("quickstart", [*extra, f"train.steps={steps}", "data.train_size=2000", "eval.clip_model=null",
                                       "output.tensorboard=false", "train.cache_dtype=fp16"], run_dir=WORK / "runs" / f"throughput-{name}",
                        fresh=True, report=lambda row: None)  # fmt: skip
        with trainer:
            trainer.fit(report=lambda row: None)
        t = trainer.recipe.train
        excluded, included, timed = median_rates(trainer.step_times, t.batch_size * t.grad_accum)
        out[name] = {"samples_per_s_data_excluded": round(excluded, 1), "samples_per_s_data_included": round(included, 1),
                     "included_over_excluded": round(included / excluded, 3), "timed_steps": timed,
                     "workers": getattr(trainer, "train_workers", None),
                     "data_images_per_s": trainer.data_images_per_s()}  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000,50000")
    parser.add_argument("--kinds", default="jsonl,datasets")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--real-sizes", default="", help="e.g. 500,2000: the SigLIP-B/16 cells (slow on a CPU)")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_scale_cpu.json")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        recipe, overrides, run_dir, steps = json.loads(args.cell)
        print(json.dumps(cell(recipe, overrides, run_dir, steps)))
        return 0

    from prefixcap.bench_report import git_revision, machine

    sizes = [int(s) for s in args.sizes.split(",") if s]
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if sizes or args.real_sizes or args.throughput:  # (nothing to measure: only the verdicts are recomputed)
        results.update(machine=machine(), git_revision=git_revision(), date=time.strftime("%Y-%m-%d"),
                       note="peak_rss_mb: ru_maxrss of the training process; peak_worker_rss_mb: the largest "
                            "DataLoader worker's; setup_s: start() to the first step (indexing, cache build or "
                            "check)")  # fmt: skip
    def cold_then_warm(group: str, kind: str, size: int, recipe: str, overrides: list[str], key: str, steps: int):
        """Two runs on one set: the first into an empty feature cache, the second reading what it left."""
        cells = results.setdefault(group, {})
        cache = WORK / "cache" / key
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
            name = f"{kind}/{size}/{state}"
            # each cell says when and from which code it was measured: a later run may add cells to an older file
            cells[name] = {**run_cell(recipe, overrides, f"{key}-{state}", steps, cache),
                           "git_revision": results["git_revision"], "date": results["date"]}  # fmt: skip
            print(group, name, cells[name], flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")

    for kind in [k for k in args.kinds.split(",") if k]:
        for size in sizes:
            overrides = data_overrides(kind, write_sets(size))
            cold_then_warm("quickstart", kind, size, "quickstart", overrides, f"{kind}-{size}", args.steps)
    real = [int(s) for s in args.real_sizes.split(",") if s]
    if real:
        swaps = [f"encoder.checkpoint={real_encoder()}", "decoder.checkpoint=tiny",
                 "train.precision=fp32", "train.batch_size=16", "eval.batch_size=16"]  # fmt: skip
        for size in real:
            overrides = [*swaps, *data_overrides("jsonl", write_sets(size))]
            cold_then_warm("siglip_b16_224", "jsonl", size, "siglip-smollm135", overrides, f"real-{size}", 3)
    if args.throughput:
        results["throughput"] = throughput(200)
        print(results["throughput"], flush=True)
    verdicts = {}
    for group in ("quickstart", "siglip_b16_224"):
        for kind in ("jsonl", "datasets"):
            rss: dict[int, float] = {}  # per size, the larger of the cold and warm peaks
            for k, v in results.get(group, {}).items():
                if k.startswith(kind + "/") and "peak_rss_mb" in v:
                    size = int(k.split("/")[1])
                    rss[size] = max(rss.get(size, 0.0), v["peak_rss_mb"])
            if len(rss) >= 2:
                ratio = rss[max(rss)] / rss[min(rss)]
                verdicts[f"{group}/{kind}"] = {"largest_over_smallest": round(ratio, 3), "met": ratio <= 1.2}
    for name, rates in results.get("throughput", {}).items():
        verdicts[f"throughput/{name}"] = {"included_over_excluded": rates["included_over_excluded"],
                                          "met": rates["included_over_excluded"] >= 0.9}  # fmt: skip
    results["target"] = {"rule": "peak RSS of the largest set <= 1.2x the smallest's; training samples/s with data "
                                 "loading included >= 0.9x excluded", **verdicts}  # fmt: skip
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["target"], indent=1))
    return 0 if all(v["met"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
