"""benchmarks/gpu_suite.sh --smoke: every step of the GPU suite on the CPU at the quickstart's sizes, so that the
script a lent GPU runs has run here first (issue 26)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_suite_runs_every_part_on_the_cpu_and_writes_one_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PREFIXCAP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert report["device"] == "cpu" and report["git_revision"]
    assert set(report["parts"]) == {"real_sizes", "decode_loop", "bench"}
    # every part ran and wrote its figures; whether a CPU met a GPU's speed target is the JSON's to say, not a test's
    assert all(not p["failed"] and p["result"] for p in report["parts"].values())
    sizes = report["parts"]["real_sizes"]["result"]
    assert set(sizes["systems"]) == {"prefix-16", "crossattn"} and sizes["systems"]["prefix-16"]["prefix_tokens"] == 16
    for system in sizes["systems"].values():
        assert system["train"]["2"]["pixels"]["samples_per_s"] > 0 and system["generate"]["1"]["images_per_s"] > 0
    assert sizes["ratios_over_crossattn"]["prefix-16"]["batch_sizes"]["2"]["train_samples_per_s"] > 0
    assert all(row["ids_identical"] for row in report["parts"]["decode_loop"]["result"]["rows"])
    bench = report["parts"]["bench"]["result"]
    assert len(bench["entries"]) == 2, bench.keys()


def test_the_full_suite_refuses_a_machine_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "no CUDA device" in done.stderr
