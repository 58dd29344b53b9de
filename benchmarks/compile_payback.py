"""Does `train.compile: true` pay for itself over a whole run? The quickstart trained end to end, eager and compiled.

    python benchmarks/compile_payback.py [--recipe recipes/quickstart.yaml] [--steps N] [--out ...json]

A compiled step is faster, but the first one compiles. Whether the run as a user starts it (`prefixcap run RECIPE`,
evaluations and the final test included) ends sooner is what decides `train.compile`'s default on a device type
(issue 26). Each form is a fresh `prefixcap run` in its own process, after an uncounted short run has built the
feature cache. The compiled form runs twice on one fresh inductor cache (TORCHINDUCTOR_CACHE_DIR): ``compiled cold``
compiles from nothing, as a user's first run does, and ``compiled warm`` finds the first one's kernels on disk, as
every later run of the same system does. From each run's log.jsonl: the first step's seconds (the compile, for the
compiled forms), the median step after step 30, the training seconds, the loss at the last step; from metrics.json,
the test accuracy. The break even is the step count past which the compiled run's training seconds are the smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fresh_run import run_command, run_record  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402


def prefixcap_run(recipe: str, out: Path, overrides: list[str], inductor: Path) -> float:
    """Seconds the whole `prefixcap run` took (start-up, cache check, training, evaluations, final test, saving)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(run_command(recipe, out, overrides), cwd=REPO, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} {overrides}: the run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def one_form(recipe: str, form: str, steps: int | None, work: Path) -> dict:
    out, compiled = work / form.replace(" ", "_"), form != "eager"
    overrides = [f"train.compile={str(compiled).lower()}"] + ([f"train.steps={steps}"] if steps else [])
    wall = prefixcap_run(recipe, out, overrides, work / "inductor")
    rows, metrics = run_record(out)
    seconds = [row["train_s"] for row in rows]
    per_step = [b - a for a, b in zip(seconds, seconds[1:])]
    accuracy = {k: v for k, v in metrics.items() if k.startswith("test_") and "accuracy" in k}
    return {"steps": rows[-1]["step"], "wall_s": round(wall, 1), "train_s": seconds[-1],
            "first_step_s": round(seconds[0], 3), "median_step_s": round(statistics.median(per_step[30:]), 4),
            "final_loss": rows[-1]["loss"], **accuracy}  # fmt: skip


FORMS = ("eager", "compiled cold", "compiled warm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile_payback_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # Builds the feature cache and warms the page cache, so neither form pays for it; not counted.
        prefixcap_run(args.recipe, Path(tmp) / "warm", ["train.steps=2", "eval.max_examples=8"], Path(tmp) / "eager")
        forms = {form: one_form(args.recipe, form, args.steps, Path(tmp)) for form in FORMS}
    eager = forms["eager"]
    result = {"benchmark": "compile_payback", "date": time.strftime("%Y-%m-%d"), "git": git_revision(),
              "machine": machine(), "command": " ".join(["python", "benchmarks/compile_payback.py", *sys.argv[1:]]),
              "recipe": args.recipe, "forms": forms}  # fmt: skip
    for form in FORMS[1:]:
        compiled = forms[form]
        saved = eager["median_step_s"] - compiled["median_step_s"]
        extra = compiled["first_step_s"] - eager["first_step_s"]
        compiled.update({"step_speedup": round(eager["median_step_s"] / compiled["median_step_s"], 3),
                         "break_even_steps": round(extra / saved) if saved > 0 else None,
                         "whole_run_speedup": round(eager["wall_s"] / compiled["wall_s"], 3)})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
