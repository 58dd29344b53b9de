"""Greedy decoding speed: transformers' ``generate`` against prefixcap's own loop (prefixcap.decoding.greedy, with a
dynamic and a static KV cache, and with ``--compile`` the static one's steps compiled, as ``generate.compile: true``
runs them), on one prefix system, per batch size; and whether all of them write the same ids.

    python benchmarks/decode_loop.py [SOURCE] [--batch-sizes 1 64] [--new-tokens 24] [--repeats 7] [--threads 1]
                                     [--compile]

SOURCE is a run directory or a saved system; without it, the quickstart recipe's system as composed (shapes-trained
encoder, random decoder). Each measurement is the decode only (prefill of the prefix + prompt embeddings, then one
token a step), from the same prefix embeddings, so encoder and connector cost nothing here. ``--new-tokens`` caps
the caption; EOS is left to the model, as in use (an untrained decoder rarely writes it, so every loop then runs the
full length). Figures: median ms per batch over ``--repeats`` after one warm-up, captions/s, and the ratio to
``generate``. The target (issue 8, CPU): the own loop is not slower than ``generate`` at any batch size; the script
exits 1 when it is, or when the ids differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import prefixcap  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402
from prefixcap.decoding import greedy  # noqa: E402
from prefixcap.recipe import GenerateConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also the compiled static-cache loop")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    system = (prefixcap.load(args.source) if args.source else prefixcap.compose("quickstart")).to(args.device).eval()
    decoder, tokenizer = system.decoder, system.decoder.tokenizer
    size = system.encoder.image_processor.size
    rows, ok = [], True
    for batch in args.batch_sizes:
        with torch.inference_mode():
            inputs = system.generation_inputs(torch.rand(batch, 3, size, size, device=args.device))
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=args.device)
        config = GenerateConfig(max_new_tokens=args.new_tokens, fast=False)
        loops = {
            "generate": lambda: decoder.generate(inputs, mask, config),
            "prefixcap-dynamic": lambda: greedy(decoder.model, inputs, max_new_tokens=args.new_tokens,
                                                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id),
            "prefixcap-static": lambda: greedy(decoder.model, inputs, max_new_tokens=args.new_tokens,
                                               eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                               cache="static"),
        }  # fmt: skip
        if args.compile:
            loops["prefixcap-compiled"] = lambda: greedy(decoder.model, inputs, max_new_tokens=args.new_tokens,
                                                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                                         cache="static", compile=True)  # fmt: skip
        started = {}
        ids = {}
        for name, run in loops.items():  # also the warm-up, and the compile of a compiled loop
            tic = time.perf_counter()
            ids[name] = run()
            started[name] = time.perf_counter() - tic
        same = all(torch.equal(ids["generate"], v) for v in ids.values())
        ok &= same
        row = {"batch_size": batch, "new_tokens": ids["generate"].shape[1], "ids_identical": same}
        if args.compile:
            row["compile_s"] = round(started["prefixcap-compiled"], 2)  # the first call, compilation included
        # interleaved, so that a slow spell of the machine hits every loop alike
        seconds: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.repeats):
            for name, run in loops.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
        for name, times in seconds.items():
            median = statistics.median(times)
            row[name] = {"ms_per_batch": round(median * 1000, 2), "captions_per_s": round(batch / median, 1),
                         "vs_generate": round(median / statistics.median(seconds["generate"]), 3)}  # fmt: skip
        ok &= row["prefixcap-dynamic"]["vs_generate"] <= 1.0
        rows.append(row)
        print(json.dumps(row))
    result = {"benchmark": "decode_loop", "date": time.strftime("%Y-%m-%d"), "git_revision": git_revision(),
              "machine": machine(), "device": args.device, "threads": args.threads,
              "source": args.source or "quickstart (composed, untrained decoder)", "rows": rows,
              "target": "prefixcap-dynamic not slower than generate, ids identical", "met": ok}  # fmt: skip
    out = args.out or REPO / "benchmarks" / "results" / f"decode_loop_{args.device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}; target {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
