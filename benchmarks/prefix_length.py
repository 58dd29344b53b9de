"""What a shorter prefix costs and buys on shapes: the quickstart trained with its encoder's 64 tokens as they are,
pooled 2x2 to 16 (pixel-shuffle, the recipe's own), and read by qformer-lite's 8 learned queries: the same three
choices as the real recipe's 196 / 49 / 32 (benchmarks/real_sizes.py prices those at real size).

    python benchmarks/prefix_length.py [--steps 2000] [--every 100] [--out benchmarks/results/prefix_length_cpu.json]

Each variant is a fresh `prefixcap run` of recipes/quickstart.yaml with only its connector section replaced (same
seed, data, steps and schedule; the feature cache is shared, so warm it with one quickstart run first). From the run's
log: the first evaluation (every ``--every`` steps, on 200 validation images) at which exact-scene accuracy reached 90%,
as a step and as training seconds (evaluation not counted); from its metrics.json: the final accuracy on the 200 test
images. Training seconds depend on the cores being free; steps do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fresh_run import run_command, run_record  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402
from prefixcap.compose import compose  # noqa: E402

QUICKSTART_CONNECTOR = {"name": "mlp", "hidden": 512, "dropout": 0.0}
VARIANTS = {  # prefix tokens -> the connector section
    64: {**QUICKSTART_CONNECTOR, "pool": "none"},
    16: {**QUICKSTART_CONNECTOR, "pool": "pixel-shuffle", "factor": 2},
    8: {"name": "qformer-lite", "queries": 8, "width": 128, "heads": 4, "layers": 2},
}
TARGET = 0.9


def run_variant(tokens: int, args: argparse.Namespace, work: Path) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["connector"] = VARIANTS[tokens]
    path = work / f"prefix{tokens}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"run{tokens}"
    total, trainable = compose(path, weights="random").parameter_counts()
    cmd = run_command(path, out, [f"train.steps={args.steps}", f"eval.every_steps={args.every}",
                                  "eval.max_examples=200"])  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    rows, metrics = run_record(out)
    curve = [(r["step"], r["train_s"], r["val"]["oracle_accuracy"]) for r in rows if "val" in r]
    reached = next(((step, s) for step, s, acc in curve if acc >= TARGET), None)
    return {
        "connector": VARIANTS[tokens],
        "prefix_tokens": tokens,
        "params_total": total,
        "params_trainable": trainable,
        "steps_to_90": reached[0] if reached else None,
        "train_s_to_90": round(reached[1], 1) if reached else None,
        "final_test_accuracy": metrics["test_oracle_accuracy"],
        "final_val_accuracy": curve[-1][2],
        "train_s": round(rows[-1]["train_s"], 1),
        "wall_s": round(wall, 1),
        "val_curve": [{"step": step, "train_s": s, "accuracy": acc} for step, s, acc in curve],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prefix_length_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for tokens in args.tokens:
            print(f"prefix of {tokens} tokens", file=sys.stderr)
            variants[str(tokens)] = run_variant(tokens, args, Path(tmp))
    report = {"benchmark": "prefix_length", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": "cpu", "git_revision": git_revision(),
              "protocol": {"recipe": "recipes/quickstart.yaml, connector replaced", "steps": args.steps,
                           "eval_every": args.every, "val_examples": 200, "test_examples": 200, "target": TARGET},
              "variants": variants}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for tokens, v in variants.items():
        print(f"{tokens:>3} tokens: 90% at step {v['steps_to_90']} ({v['train_s_to_90']} s training), final test "
              f"{v['final_test_accuracy']:.3f}, {v['params_trainable']} trainable, {v['train_s']} s training")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
