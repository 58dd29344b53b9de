"""How long `prefixcap plugins` takes, wall clock, as a user runs it (console script, fresh process each time).

Target: under 1.0 s. Listing must not import torch: plugins register metadata and a lazy factory path only.

    python benchmarks/plugins_listing.py [--runs 20] [--out benchmarks/results/plugins_listing.json]

Exits 1 if the median run is over the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BOUND_S = 1.0
REPO = Path(__file__).resolve().parent.parent


def time_command(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    subprocess.run(argv, check=True, capture_output=True, env=env)  # warm the file cache once, untimed
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return times


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plugins_listing.json")
    args = parser.parse_args()

    exe = str(Path(sys.executable).with_name("prefixcap"))
    cases = {
        "prefixcap plugins": [exe, "plugins"],
        "prefixcap plugins --kind decoder": [exe, "plugins", "--kind", "decoder"],
        "prefixcap plugins --json": [exe, "plugins", "--json"],
    }
    results = {}
    for label, argv in cases.items():
        times = time_command(argv, args.runs, {**os.environ, "COLUMNS": "120"})
        results[label] = {
            "runs": len(times),
            "median_s": round(statistics.median(times), 4),
            "p95_s": round(sorted(times)[max(0, int(0.95 * len(times)) - 1)], 4),
            "max_s": round(max(times), 4),
            "min_s": round(min(times), 4),
        }
        print(f"{label:36s} median {results[label]['median_s']:.3f} s   max {results[label]['max_s']:.3f} s")
    ok = all(r["median_s"] < BOUND_S for r in results.values())
    report = {
        "benchmark": "plugins_listing",
        "bound_s": BOUND_S,
        "pass": ok,
        "results": results,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "device": "CPU (no accelerator used)"},  # fmt: skip
        "plugin_filter": os.environ.get("PREFIXCAP_LOAD_PLUGINS", "(unset: all installed plugins)"),
        "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'pass' if ok else 'FAIL'}: bound {BOUND_S} s; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
