"""A recipe trained as a user starts it, `prefixcap run RECIPE`, in a fresh process: the benchmarks that time whole
runs (threads.py, prefix_length.py, compile_payback.py) share it, so each run's threads, caches and memory are its
own, and torch reads OpenMP's and inductor's environment anew."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def run_command(recipe: str | Path, out: Path, overrides: list[str]) -> list[str]:
    """`prefixcap run RECIPE --fresh --out OUT --set K=V ...` in this interpreter, tensorboard off."""
    sets = [arg for override in [*overrides, "output.tensorboard=false"] for arg in ("--set", override)]
    return [sys.executable, "-m", "prefixcap", "run", str(recipe), "--fresh", "--out", str(out), *sets]


def run_record(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A finished run's log.jsonl rows and its metrics.json."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "metrics.json").read_text())
