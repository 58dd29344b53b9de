"""Caption latency (batch 1) and size on disk of one system three ways: PyTorch eager, ONNX fp32 and ONNX int8.

    python benchmarks/caption_latency.py [SOURCE] [--images 50] [--warmup 3] [--threads 1] [--out PATH]

SOURCE is a run directory or a saved system; without it, the quickstart recipe's system is built as composed
(shapes-trained encoder, random decoder: untrained, so its captions rarely end early and every backend writes about
``generate.max_new_tokens`` tokens per image). The system is exported with prefixcap.export (int8 too), and each
backend captions the same shapes images, drawn at the encoder's input size, one at a time, end to end (PIL image in,
text out: preprocessing, encoder, greedy decoding with the KV cache, detokenising). Figures: p50/p95/mean seconds per
image after warm-up, new tokens per caption (ONNX), size on disk (PyTorch: every weight as fp32 safetensors, which is
what a deployment ships; ONNX: the graph files), the ratios to PyTorch, and how often the captions agree.

Every backend gets the same number of threads (``--threads``, default 1): on a machine whose cores other jobs share,
PyTorch's and onnxruntime's thread pools spin waiting for a busy core (on the 2-core machine of the first results, a
tiny system's PyTorch caption took ~1 s with 2 threads and ~20 ms with 1).

Figures only, no target: it exits 0 whenever it wrote its results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default system needs no hub; make sure nothing reaches for it

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import prefixcap  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402
from prefixcap.data import ShapesOptions  # noqa: E402
from prefixcap.data.shapes import ShapesSource  # noqa: E402
from prefixcap.export import export_system  # noqa: E402
from prefixcap.onnx_captioner import OnnxCaptioner  # noqa: E402
from prefixcap.persist import saved_system_dir  # noqa: E402
from prefixcap.weights import module_state  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def time_captions(caption: Callable[[list[Image.Image]], list[str]], images: list[Image.Image], warmup: int
                  ) -> tuple[list[float], list[str]]:  # fmt: skip
    for image in images[:warmup]:
        caption([image])
    seconds, captions = [], []
    for image in images:
        start = time.perf_counter()
        captions += caption([image])
        seconds.append(time.perf_counter() - start)
    return seconds, captions


def figures(seconds: list[float], disk_bytes: int) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {"p50_s": round(statistics.median(ordered), 5),
            "p95_s": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 5),
            "mean_s": round(statistics.fmean(ordered), 5), "disk_bytes": disk_bytes}  # fmt: skip


def torch_disk_bytes(system: torch.nn.Module, directory: Path) -> int:
    path = directory / "all-weights.safetensors"
    save_file(module_state(system, everything=True), str(path))
    return path.stat().st_size


def onnx_disk_bytes(directory: Path, manifest: dict[str, Any], key: str) -> int:
    return sum((directory / graph[key]).stat().st_size for graph in manifest["graphs"].values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, help="run directory or saved system (default: quickstart)")
    parser.add_argument("--images", type=int, default=50, help="timed captions per backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every backend")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "caption_latency_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = args.source
        if source is None:
            torch.manual_seed(0)
            source = prefixcap.compose("quickstart").save(work / "system")
        exported = work / "onnx"
        start = time.perf_counter()
        manifest = export_system(source, exported, int8=True)
        export_s = time.perf_counter() - start
        system = prefixcap.load(saved_system_dir(source))  # the manifest records no absolute path
        size = manifest["image"]["size"]
        images = [e.image for e in ShapesSource(ShapesOptions(image_size=size, test_size=args.images)).examples("test")]
        onnx = {key: OnnxCaptioner(exported, int8=key == "int8_file", threads=args.threads)
                for key in ("file", "int8_file")}  # fmt: skip

        results, captions = {}, {}
        for name, caption, disk in (
            ("pytorch", system.caption, torch_disk_bytes(system, work)),
            ("onnx_fp32", onnx["file"].caption, onnx_disk_bytes(exported, manifest, "file")),
            ("onnx_int8", onnx["int8_file"].caption, onnx_disk_bytes(exported, manifest, "int8_file")),
        ):  # fmt: skip
            seconds, captions[name] = time_captions(caption, images, args.warmup)
            results[name] = figures(seconds, disk)
            print(f"{name:10s} p50 {results[name]['p50_s'] * 1000:8.2f} ms  p95 {results[name]['p95_s'] * 1000:8.2f} ms"
                  f"  {disk / 2**20:8.2f} MiB")  # fmt: skip
        for key, name in (("file", "onnx_fp32"), ("int8_file", "onnx_int8")):
            ids = onnx[key].generate(onnx[key].pixel_values(images))
            results[name]["new_tokens_per_caption"] = round(statistics.fmean(map(len, ids)), 2)

    base = results["pytorch"]
    ratios = {name: {"p50_speedup": round(base["p50_s"] / r["p50_s"], 3),
                     "p95_speedup": round(base["p95_s"] / r["p95_s"], 3),
                     "disk_ratio": round(r["disk_bytes"] / base["disk_bytes"], 4)}
              for name, r in results.items() if name != "pytorch"}  # fmt: skip

    def agreement(a: str, b: str) -> float:
        return round(statistics.fmean(x == y for x, y in zip(captions[a], captions[b])), 3)

    report = {
        "benchmark": "caption_latency",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "device": "cpu",
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": args.threads},
        "versions": {dist: metadata.version(dist) for dist in ("torch", "transformers", "onnx", "onnxscript")}
        | {"onnxruntime": onnxruntime.__version__},
        "git_revision": git_revision(),
        "system": {"source": str(args.source) if args.source else "recipes/quickstart.yaml, composed (untrained)",
                   "name": manifest["system"], "parameters": sum(p.numel() for p in system.parameters()),
                   "image_size": size, "max_new_tokens": manifest["generate"]["max_new_tokens"],
                   "export_s": round(export_s, 1)},  # fmt: skip
        "protocol": {"images": args.images, "warmup": args.warmup, "batch_size": 1,
                     "timed": "PIL image in, caption out, one image per call, perf_counter",
                     "disk": "pytorch: every weight as fp32 safetensors; onnx: the graph files, no tokenizer"},  # fmt: skip
        "results": results,
        "ratios_to_pytorch": ratios,
        "caption_agreement": {"onnx_fp32_vs_pytorch": agreement("onnx_fp32", "pytorch"),
                              "onnx_int8_vs_onnx_fp32": agreement("onnx_int8", "onnx_fp32")},  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio['p50_speedup']}x faster than PyTorch at p50, {ratio['disk_ratio']}x its size on disk")
    print(f"captions agree: {report['caption_agreement']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
