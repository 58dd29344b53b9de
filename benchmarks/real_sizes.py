"""Training and generation cost of the prefix system, with three prefix lengths, against the cross-attention baseline.

    --scale real (default)
    prefix-196  recipes/siglip-smollm135.yaml          SigLIP-B/16 (frozen) + linear + SmolLM-135M, LoRA r16 q,k,v,o
    prefix-49   the same, its 196 tokens pooled 2x2 by pixel-shuffle before the linear projection
    prefix-32   the same, read by qformer-lite's 32 learned queries
    crossattn   recipes/crossattn-vit-distilgpt2.yaml  ViT-B/16 (frozen), cross-attended by distilgpt2 trained whole

    --scale quickstart: recipes/quickstart.yaml with 64 / 16 / 8 prefix tokens, and recipes/quickstart-crossattn.yaml

Every system is built by prefixcap's own compose() with random weights (``weights="random"``): cost does not depend
on the weights' values, and nothing is downloaded. Each runs in a process of its own, so that its peak memory is its
own. Per system: training samples/s per batch size (AdamW steps, pixels in, and again from cached encoder features),
the peak memory of training, greedy decoding through prefixcap's loop (prefixcap/decoding.py, pixels in, exactly 30
new tokens) as images/s and ms per batch, and parameter counts. ``--compile`` measures the compiled forms instead:
the training forward through torch.compile (as ``train.compile: true``) and the decoding steps compiled on a static
cache (as ``generate.compile: true``), with the seconds the first call took.

    python benchmarks/real_sizes.py [--scale real|quickstart] [--systems prefix-196,prefix-49,prefix-32,crossattn]
        [--batch-sizes 64,256] [--generate-batch-sizes 1,64,256] [--steps 20] [--warmup 3] [--compile]
        [--device cuda|cpu] [--precision auto|fp32|bf16] [--out PATH]

Figures only, no target: it exits 0 whenever it wrote its results (a cell that ran out of memory holds the error).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights need no hub; make sure nothing reaches for it

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor  # noqa: E402

from prefixcap.bench import peak_memory  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402
from prefixcap.compose import compose  # noqa: E402
from prefixcap.decoding import greedy  # noqa: E402
from prefixcap.interfaces import Batch, System  # noqa: E402
from prefixcap.systems.crossattn import CrossAttnSystem  # noqa: E402
from prefixcap.systems.prefix import PrefixSystem  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# scale -> system -> (recipe, connector section replacing the recipe's, or None to keep it)
SYSTEMS: dict[str, dict[str, tuple[str, dict[str, Any] | None]]] = {
    "real": {
        "prefix-196": ("recipes/siglip-smollm135.yaml", None),
        "prefix-49": ("recipes/siglip-smollm135.yaml", {"name": "linear", "pool": "pixel-shuffle", "factor": 2,
                                                        "lr": 3.0e-4}),
        "prefix-32": ("recipes/siglip-smollm135.yaml", {"name": "qformer-lite", "queries": 32, "lr": 3.0e-4}),
        "crossattn": ("recipes/crossattn-vit-distilgpt2.yaml", None),
    },
    "quickstart": {
        "prefix-64": ("recipes/quickstart.yaml", {"name": "mlp", "hidden": 512, "dropout": 0.0}),
        "prefix-16": ("recipes/quickstart.yaml", None),
        "prefix-8": ("recipes/quickstart.yaml", {"name": "qformer-lite", "queries": 8, "width": 128}),
        "crossattn": ("recipes/quickstart-crossattn.yaml", None),
    },
}
CAPTION_TOKENS = 32
NEW_TOKENS = 30
FIGURES_NOTE = ("batch size / median time of a call after warm-up; training: AdamW over the trainable parameters "
                "with the recipe's learning rates and gradient clipping, autocast at the precision above; decoding: "
                "greedy through prefixcap.decoding.greedy, pixels in, token ids out, exactly new_tokens tokens, same "
                "autocast; compile_s: the first call, compilation included (compiled forms only)")  # fmt: skip
CUDA_MEMORY_NOTE = "torch.cuda.max_memory_allocated over warm-up and timed steps"
CPU_MEMORY_NOTE = ("peak RSS of the system's own process (weights included), sampled from /proc/self/statm every "
                   "10 ms (prefixcap.bench.peak_memory)")  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Callable[[], object], batch_size: int, unit: str, args: argparse.Namespace,
            device: torch.device) -> dict[str, float]:  # fmt: skip
    """Median over ``args.steps`` timed calls after ``args.warmup`` untimed ones, and the peak memory of all."""
    times, first = [], 0.0
    with peak_memory(device.type) as memory:
        for i in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            if i == 0:
                first = time.perf_counter() - start
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {unit: round(batch_size / median, 3), "median_ms": round(median * 1000, 2),
              "peak_memory_mib": round(memory["mb"], 1)}  # fmt: skip
    if args.compile:
        result["compile_s"] = round(first, 2)
    return result


def random_batch(system: System, batch_size: int, device: torch.device, features: bool) -> Batch:
    """Random pixels and caption ids: cost depends on their shapes only. Random weights come without a tokenizer,
    so the ids are drawn here rather than tokenized."""
    vocab = system.decoder.model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (batch_size, CAPTION_TOKENS), device=device)
    pixels = random_pixels(system, batch_size, device)
    cached = None
    if features:
        with torch.no_grad():  # as the feature cache computes them: once, fp32, outside training
            cached = system.encoder(pixels)
        pixels = None
    return Batch(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, features=cached)


def random_pixels(system: System, batch_size: int, device: torch.device) -> Tensor:
    size = system.encoder.image_processor.size
    return torch.randn(batch_size, 3, size, size, device=device)


def train_step(system: System, batch: Batch, autocast: Callable[[], Any], compiled: bool) -> Callable[[], None]:
    """One optimiser step as prefixcap.training takes it: autocast forward (compiled as ``train.compile`` compiles
    it) and losses, backward, clipping, AdamW."""
    train = system.recipe.train
    groups = system.param_groups()
    optimizer = torch.optim.AdamW([{"params": g.params, "lr": g.lr or train.lr} for g in groups])
    params = [p for g in groups for p in g.params]
    forward = torch.compile(system) if compiled else system

    def step() -> None:
        with autocast():
            loss = system.total_loss(forward(batch), batch)
        loss.backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.inference_mode()
def generate_ids(system: System, pixels: Tensor, compiled: bool) -> Tensor:
    """Each system's greedy decoding through prefixcap's loop up to the token ids, with what needs a tokenizer
    (prompt text, decoding to text) left out; no EOS, so exactly NEW_TOKENS new tokens for every system."""
    if isinstance(system, CrossAttnSystem):
        ids = system.greedy_ids(pixels, max_new_tokens=NEW_TOKENS, eos_id=None, compile=compiled)
    elif isinstance(system, PrefixSystem):
        decoder = system.decoder
        if decoder.options.prompt:
            raise SystemExit("the recipe's decoder.prompt needs a tokenizer, which random weights come without")
        bos = decoder.config.bos_token_id
        prompt = torch.tensor([bos] if decoder.options.add_bos and bos is not None else [], dtype=torch.long)
        prefix = system.prefix(pixels)  # (B, K, H)
        prompt = decoder.embed(prompt.to(prefix.device)[None].expand(prefix.shape[0], -1))  # (B, P, H)
        inputs = torch.cat([prefix.to(prompt.dtype), prompt], dim=1)
        ids = greedy(decoder.model, inputs, max_new_tokens=NEW_TOKENS, eos_id=None, pad_id=0, compile=compiled)
    else:
        raise TypeError(f"no generation path for {type(system).__name__}")
    if ids.shape[1] != NEW_TOKENS:
        raise RuntimeError(f"{type(system).__name__} generated {ids.shape[1]} tokens, not {NEW_TOKENS}")
    return ids


def out_of_memory(e: RuntimeError) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "not enough memory" in str(e)


def attempt(run: Callable[[], dict[str, float]], system: System, device: torch.device) -> dict[str, Any]:
    try:
        result: dict[str, Any] = run()
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        result = {"error": str(e).splitlines()[0]}
    # Outside the except block, so the traceback's tensors are gone before memory is handed back.
    system.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def precision_for(requested: str, recipe_precision: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    bf16 = device.type == "cuda" and recipe_precision == "bf16" and torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "fp32"


def bench_system(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One system's figures, in this process."""
    recipe, connector = SYSTEMS[args.scale][name]
    torch.manual_seed(0)
    parts = {"connector": connector} if connector else {}
    system = compose(REPO / recipe, weights="random", **parts).to(device)
    total, trainable = system.parameter_counts()
    precision = precision_for(args.precision, system.recipe.train.precision, device)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def train(batch_size: int, features: bool) -> dict[str, float]:
        system.train()
        batch = random_batch(system, batch_size, device, features)
        return measure(train_step(system, batch, autocast, args.compile), batch_size, "samples_per_s", args, device)

    def generate(batch_size: int) -> dict[str, float]:
        system.eval()
        pixels = random_pixels(system, batch_size, device)

        def call() -> None:
            with autocast():
                generate_ids(system, pixels, args.compile)

        return measure(call, batch_size, "images_per_s", args, device)

    train_cells = {}
    for bs in args.batch_sizes:
        print(f"{name}: training at batch size {bs}", file=sys.stderr)
        train_cells[str(bs)] = {
            "pixels": attempt(lambda: train(bs, features=False), system, device),
            "features": (attempt(lambda: train(bs, features=True), system, device) if system.accepts_features
                         else {"error": "this system does not train from cached features"}),
        }  # fmt: skip
    generate_cells = {}
    for bs in args.generate_batch_sizes:
        print(f"{name}: decoding at batch size {bs}", file=sys.stderr)
        generate_cells[str(bs)] = attempt(lambda: generate(bs), system, device)
    tokens = system.connector.output_tokens(system.encoder.num_tokens) if isinstance(system, PrefixSystem) else None
    return {"recipe": recipe, "connector": connector, "prefix_tokens": tokens, "precision": precision,
            "params_total": total, "params_trainable": trainable, "train": train_cells,
            "generate": generate_cells}  # fmt: skip


def in_own_process(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """bench_system in a fresh interpreter: a CPU's peak RSS is then this system's alone (freed memory is seldom
    handed back to the OS, so an earlier system's would count)."""
    cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


FIGURES = {  # name in the ratios -> (path in a system's result, key), at the batch sizes both were measured at
    "train_samples_per_s": (("train", "pixels"), "samples_per_s"),
    "train_features_samples_per_s": (("train", "features"), "samples_per_s"),
    "train_peak_memory_mib": (("train", "pixels"), "peak_memory_mib"),
    "generate_images_per_s": (("generate",), "images_per_s"),
}


def cell(result: dict[str, Any], path: tuple[str, ...], bs: str) -> dict[str, Any]:
    found = result[path[0]].get(bs, {})
    return found.get(path[1], {}) if len(path) > 1 else found


def ratios(prefix: dict[str, Any], crossattn: dict[str, Any]) -> dict[str, Any]:
    """prefix / crossattn for every figure both systems have, per batch size."""
    out: dict[str, Any] = {key: round(prefix[key] / crossattn[key], 4) for key in ("params_total", "params_trainable")}
    sizes = sorted({*prefix["train"], *prefix["generate"]}, key=int)
    for bs in sizes:
        row = {}
        for figure, (path, key) in FIGURES.items():
            a, b = cell(prefix, path, bs).get(key), cell(crossattn, path, bs).get(key)
            if a is not None and b is not None:
                row[figure] = round(a / b, 3)
        if row:
            out.setdefault("batch_sizes", {})[bs] = row
    return out


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mem = "peak train MiB" + (" (RSS)" if report["device"] == "cpu" else "")
    form = "compiled" if report["protocol"]["compiled"] else "eager"
    table = Table(title=f"{report['protocol']['scale']} sizes, random weights, {form}, on {report['device']}")
    for column in ("system", "batch", "train samples/s", "from features", mem, "decode images/s", "decode ms"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, result in report["systems"].items():
        for bs in sorted({*result["train"], *result["generate"]}, key=int):
            train, gen = result["train"].get(bs, {}), result["generate"].get(bs, {})
            table.add_row(name, bs, *(str(x) for x in (
                train.get("pixels", {}).get("samples_per_s", "-"), train.get("features", {}).get("samples_per_s", "-"),
                train.get("pixels", {}).get("peak_memory_mib", "-"), gen.get("images_per_s", "-"),
                gen.get("median_ms", "-"))))  # fmt: skip
    for name, found in report.get("ratios_over_crossattn", {}).items():
        for bs, row in found.get("batch_sizes", {}).items():
            table.add_row(f"{name}/crossattn", bs, *(str(row.get(f, "-")) for f in FIGURES), "")
    Console(stderr=True).print(table)
    for name, result in report["systems"].items():
        print(f"{name}: {result['params_total']:,} parameters, {result['params_trainable']:,} trainable, "
              f"{result['precision']}", file=sys.stderr)  # fmt: skip


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SYSTEMS), default="real")
    parser.add_argument("--systems", type=lambda s: s.split(","), default=None, help="default: all of the scale's")
    parser.add_argument("--batch-sizes", type=sizes, default=[64, 256], help="training; empty: none")
    parser.add_argument("--generate-batch-sizes", type=sizes, default=[1, 64, 256], help="decoding; empty: none")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="the compiled forms (torch.compile) instead of eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: the recipes' bf16 on a CUDA device that supports it, else fp32")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/real_sizes_<device>[_compiled].json")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this system here, print its JSON
    args = parser.parse_args()
    names = args.systems or list(SYSTEMS[args.scale])
    unknown = set(names) - set(SYSTEMS[args.scale])
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)} at scale {args.scale}; choose from "
                     f"{', '.join(SYSTEMS[args.scale])}")  # fmt: skip
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup 1 or more: the first call compiles")
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(bench_system(args.one, args, device)))
        return 0
    suffix = "_compiled" if args.compile else ""
    out = args.out or REPO / "benchmarks" / "results" / f"real_sizes_{device.type}{suffix}.json"

    systems = {name: in_own_process(name, args) for name in names}
    report: dict[str, Any] = {
        "benchmark": "real_sizes",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "git_revision": git_revision(),
        "protocol": {
            "scale": args.scale,
            "compiled": args.compile,
            "weights": "random, compose(recipe, weights='random') after torch.manual_seed(0)",
            "caption_tokens": CAPTION_TOKENS,
            "new_tokens": NEW_TOKENS,
            "steps": args.steps,
            "warmup": args.warmup,
            "figures": FIGURES_NOTE,
            "memory": CUDA_MEMORY_NOTE if device.type == "cuda" else CPU_MEMORY_NOTE,
        },
        "systems": systems,
    }
    if "crossattn" in systems:
        report["ratios_over_crossattn"] = {name: ratios(result, systems["crossattn"])
                                           for name, result in systems.items() if name != "crossattn"}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
