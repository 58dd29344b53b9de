"""Training and generation cost of the prefix system and the cross-attention baseline at their real sizes.

    prefix     recipes/siglip-smollm135.yaml          SigLIP-B/16 (frozen) + linear + SmolLM-135M, LoRA r16 q,k,v,o
    crossattn  recipes/crossattn-vit-distilgpt2.yaml  ViT-B/16 (frozen), cross-attended by distilgpt2 trained whole

Both are built by prefixcap's own compose() with random weights (``weights="random"``): cost does not depend on the
weights' values, and nothing is downloaded. Per system and batch size it measures training samples/s (AdamW steps,
pixels in, and again from cached encoder features), the peak memory of training, greedy generation images/s (pixels
in, exactly 30 new tokens) and parameter counts, and writes them with the machine and git revision as JSON.

    python benchmarks/real_sizes.py [--batch-sizes 64,256] [--steps 20] [--warmup 3] [--systems prefix,crossattn]
                                    [--device cuda|cpu] [--precision auto|fp32|bf16] [--out PATH]

Figures only, no target: it exits 0 whenever it wrote its results (a cell that ran out of memory holds the error).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from prefixcap.bench import peak_memory  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402
from prefixcap.compose import compose  # noqa: E402
from prefixcap.interfaces import Batch, System  # noqa: E402
from prefixcap.systems.crossattn import CrossAttnSystem  # noqa: E402
from prefixcap.systems.prefix import PrefixSystem  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"prefix": "recipes/siglip-smollm135.yaml", "crossattn": "recipes/crossattn-vit-distilgpt2.yaml"}
CAPTION_TOKENS = 32
NEW_TOKENS = 30
MIB = 2**20
FIGURES_NOTE = ("batch size / median time of a step after warm-up; training: AdamW over the trainable parameters "
                "with the recipe's learning rates and gradient clipping, autocast at the precision above; generation: "
                "greedy, pixels in, token ids out, same autocast")  # fmt: skip
CUDA_MEMORY_NOTE = "torch.cuda.max_memory_allocated over warm-up and timed steps"
CPU_MEMORY_NOTE = "peak RSS of the whole process (weights included), sampled from /proc/self/statm every 10 ms (prefixcap.bench.peak_memory)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], object], batch_size: int, unit: str, args: argparse.Namespace,
            device: torch.device) -> dict[str, float]:  # fmt: skip
    """Median over ``args.steps`` timed calls after ``args.warmup`` untimed ones, and the peak memory of all."""
    times = []
    with peak_memory(device.type) as memory:
        for i in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {unit: round(batch_size / median, 3), "median_step_s": round(median, 5),
            "peak_memory_mib": round(memory["mb"], 1)}  # fmt: skip


def random_batch(system: System, batch_size: int, device: torch.device, features: bool) -> Batch:
    """Random pixels and caption ids: cost depends on their shapes only. Random weights come without a tokenizer,
    so the ids are drawn here rather than tokenized."""
    vocab = system.decoder.model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (batch_size, CAPTION_TOKENS), device=device)
    size = system.encoder.image_processor.size
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    cached = None
    if features:
        with torch.no_grad():  # as the feature cache computes them: once, fp32, outside training
            cached = system.encoder(pixels)
        pixels = None
    return Batch(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, features=cached)


def train_step(system: System, batch: Batch, autocast: Callable[[], Any]) -> Callable[[], None]:
    """One optimiser step as prefixcap.training takes it: autocast forward and loss, backward, clipping, AdamW."""
    train = system.recipe.train
    groups = system.param_groups()
    optimizer = torch.optim.AdamW([{"params": g.params, "lr": g.lr or train.lr} for g in groups])
    params = [p for g in groups for p in g.params]

    def step() -> None:
        with autocast():
            loss, _ = system.loss(batch)
        loss.backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.inference_mode()
def generate_ids(system: System, pixels: Tensor) -> Tensor:
    """Each system's own generate() up to the token ids, with what needs a tokenizer (prompt text, decoding to text)
    left out, and exactly NEW_TOKENS new tokens for every system (EOS is never allowed earlier)."""
    forced = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
    if isinstance(system, CrossAttnSystem):
        dec = system.decoder
        ids = system.hf_model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=system.encoder(pixels)),
                                       decoder_start_token_id=dec.start_id, eos_token_id=dec.eos_id,
                                       pad_token_id=dec.pad_id, **forced)[:, 1:]  # fmt: skip
    elif isinstance(system, PrefixSystem):
        decoder = system.decoder
        if decoder.options.prompt:
            raise SystemExit("the recipe's decoder.prompt needs a tokenizer, which random weights come without")
        bos = decoder.config.bos_token_id
        prompt = torch.tensor([bos] if decoder.options.add_bos and bos is not None else [], dtype=torch.long)
        prefix = system.prefix(pixels)  # (B, K, H)
        prompt = decoder.embed(prompt.to(prefix.device)[None].expand(prefix.shape[0], -1))  # (B, P, H)
        inputs = torch.cat([prefix.to(prompt.dtype), prompt], dim=1)
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        eos = decoder.config.eos_token_id
        ids = decoder.model.generate(inputs_embeds=inputs, attention_mask=mask, eos_token_id=eos, pad_token_id=eos,
                                     **forced)  # fmt: skip
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
    torch.manual_seed(0)
    system = compose(REPO / RECIPES[name], weights="random").to(device)
    total, trainable = system.parameter_counts()
    precision = precision_for(args.precision, system.recipe.train.precision, device)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def train(batch_size: int, features: bool) -> dict[str, float]:
        system.train()
        batch = random_batch(system, batch_size, device, features)
        return measure(train_step(system, batch, autocast), batch_size, "samples_per_s", args, device)

    def generate(batch_size: int) -> dict[str, float]:
        system.eval()
        size = system.encoder.image_processor.size
        pixels = torch.randn(batch_size, 3, size, size, device=device)

        def step() -> None:
            with autocast():
                generate_ids(system, pixels)

        return measure(step, batch_size, "images_per_s", args, device)

    cells = {}
    for bs in args.batch_sizes:
        print(f"{name}: batch size {bs}", file=sys.stderr)
        cells[str(bs)] = {
            "train_pixels": attempt(lambda: train(bs, features=False), system, device),
            "train_features": (attempt(lambda: train(bs, features=True), system, device) if system.accepts_features
                               else {"error": "this system does not train from cached features"}),
            "generate": attempt(lambda: generate(bs), system, device),
        }  # fmt: skip
    return {"recipe": RECIPES[name], "precision": precision, "params_total": total, "params_trainable": trainable,
            "batch_sizes": cells}  # fmt: skip


FIGURES = {  # name in the ratios -> (measurement, key)
    "train_samples_per_s": ("train_pixels", "samples_per_s"),
    "train_features_samples_per_s": ("train_features", "samples_per_s"),
    "train_peak_memory_mib": ("train_pixels", "peak_memory_mib"),
    "generate_images_per_s": ("generate", "images_per_s"),
}


def ratios(prefix: dict[str, Any], crossattn: dict[str, Any]) -> dict[str, Any]:
    """prefix / crossattn for every figure both systems have."""
    cells = {}
    for bs, cell in prefix["batch_sizes"].items():
        other = crossattn["batch_sizes"][bs]
        cells[bs] = {f: round(cell[m][k] / other[m][k], 3) for f, (m, k) in FIGURES.items()
                     if k in cell[m] and k in other[m]}  # fmt: skip
    params = {key: round(prefix[key] / crossattn[key], 4) for key in ("params_total", "params_trainable")}
    return {**params, "batch_sizes": cells}


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mem = "peak train MiB" + (" (RSS)" if report["device"] == "cpu" else "")
    table = Table(title=f"real sizes, random weights, on {report['device']}")
    for column in ("system", "batch", "train samples/s", "from features", mem, "generate images/s"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, result in report["systems"].items():
        for bs, cell in result["batch_sizes"].items():
            values = [cell[m].get(k, "error") for m, k in FIGURES.values()]
            table.add_row(name, bs, *map(str, values))
    for bs, row in report.get("ratios_prefix_over_crossattn", {}).get("batch_sizes", {}).items():
        table.add_row("prefix/crossattn", bs, *(str(row.get(f, "-")) for f in FIGURES))
    Console().print(table)
    for name, result in report["systems"].items():
        print(f"{name}: {result['params_total']:,} parameters, {result['params_trainable']:,} trainable, "
              f"{result['precision']}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--systems", type=lambda s: s.split(","), default=list(RECIPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: the recipes' bf16 on a CUDA device that supports it, else fp32")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/real_sizes_<device>.json")
    args = parser.parse_args()
    unknown = set(args.systems) - set(RECIPES)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(RECIPES)}")
    device = torch.device(args.device)
    out = args.out or REPO / "benchmarks" / "results" / f"real_sizes_{device.type}.json"

    systems = {}
    for name in args.systems:
        systems[name] = bench_system(name, args, device)
        gc.collect()  # one system in memory at a time: the CPU figure is the whole process's RSS
    report: dict[str, Any] = {
        "benchmark": "real_sizes",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "git_revision": git_revision(),
        "protocol": {
            "weights": "random, compose(recipe, weights='random') after torch.manual_seed(0)",
            "precision": {name: s["precision"] for name, s in systems.items()},
            "caption_tokens": CAPTION_TOKENS,
            "new_tokens": NEW_TOKENS,
            "steps": args.steps,
            "warmup": args.warmup,
            "figures": FIGURES_NOTE,
            "memory": CUDA_MEMORY_NOTE if device.type == "cuda" else CPU_MEMORY_NOTE,
        },
        "systems": systems,
    }
    if {"prefix", "crossattn"} <= systems.keys():
        report["ratios_prefix_over_crossattn"] = ratios(systems["prefix"], systems["crossattn"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
