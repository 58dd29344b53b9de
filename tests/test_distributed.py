"""Data-parallel training: `torchrun --nproc_per_node 2 -m prefixcap run` (gloo on the CPU) trains as one process does
on the same global batch, writes the run directory once, and resumes; `accelerate launch` does the same. Real
launches, as a user would start them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prefixcap

# Global batch 8 in micro-batches of 4 examples per process, with accumulation; the shapes captions differ in length,
# so the two processes' slices hold different numbers of caption tokens.
ARGS = [
    "data.name=shapes", "data.train_size=48", "data.val_size=8", "data.test_size=8", "train.steps=24",
    "train.batch_size=8", "train.grad_accum=2", "train.lr=3e-3", "eval.every_steps=12", "eval.batch_size=8",
    "output.log_every_steps=1", "output.save_every_steps=6", "connector.hidden=32", "generate.max_new_tokens=16",
]  # fmt: skip
# Two processes sum gradients in another order than one process does, and compute the itc embeddings of a slice
# rather than of the whole micro-batch: equal up to float rounding, not to the bit. Measured: final metrics within
# 3e-7 relative with caption-ce alone (the README's figure), 6.6e-7 since the quickstart trains itc too; logged losses
# and validation values, which the log rounds to 6 decimals, at most one unit apart in that last decimal (three with
# itc); weights within 6e-6. Averaging the two processes' token means instead (the mistake this guards against) is off by up to
# 5e-3 in the losses and 3e-2 in the weights; contrasting each process's slice alone in itc, by 0.35 in test loss.
REL = 1e-6  # final metrics, relative
LOG_DECIMALS = 6  # log.jsonl rounds every value to this many decimals
LOG_UNITS = 5  # two runs may differ by a few units there (measured: 3)
ATOL = 1e-5  # weights, absolute: Adam normalises each gradient, so a near-zero one's rounding shows in full

RESUME = """
import sys
from prefixcap.training import run

run("quickstart", sys.argv[2:], run_dir=sys.argv[1], stop_after=9, report=lambda row: None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*command: str, cache: Path, processes: int = 1, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """``python [-m torch.distributed.run ...] command`` (or ``accelerate launch``) with the test suite's environment,
    on the CPU."""
    port = free_port()
    if launcher == "accelerate":  # every setting given, so accelerate neither asks nor warns about a missing config;
        # bf16 as a user's `accelerate config` might say: the recipe's train.precision (fp32) must still decide
        launcher_args = ["-m", "accelerate.commands.launch", "--cpu", "--num_machines", "1", "--num_processes",
                         str(processes), "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_ip",
                         "127.0.0.1", "--main_process_port", str(port)]  # fmt: skip
    else:
        launcher_args = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                         "127.0.0.1", "--master_port", str(port)]  # fmt: skip
    env = {**os.environ, "PREFIXCAP_LOAD_PLUGINS": "", "HF_HUB_OFFLINE": "1", "PREFIXCAP_CACHE": str(cache),
           "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # fmt: skip
    argv = [sys.executable, *(launcher_args if processes > 1 else []), *command]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def train(run_dir: Path, cache: Path, processes: int = 1, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    sets = [a for arg in ARGS for a in ("--set", arg)]
    result = launch("-m", "prefixcap", "run", "quickstart", *sets, "--out", str(run_dir), cache=cache,
                    processes=processes, launcher=launcher)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def log(run_dir: Path) -> dict[str, float]:
    """Every logged number but the timings, as {"step/name": value}: the loss of each step, every evaluation."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    flat = {f"{r['step']}/{k}": v for r in rows for k, v in r.items() if k not in ("val", "samples_per_s", "data_images_per_s", "train_s")}
    return flat | {f"{r['step']}/val_{k}": v for r in rows for k, v in r.get("val", {}).items()}


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(b) == pytest.approx(metrics(a), rel=REL)
    first_log, second_log = log(a), log(b)
    assert second_log.keys() == first_log.keys()
    units = {k: abs(round(second_log[k] * 10**LOG_DECIMALS) - round(first_log[k] * 10**LOG_DECIMALS))
             for k in first_log}  # fmt: skip
    assert max(units.values()) <= LOG_UNITS, {k: (first_log[k], second_log[k]) for k, u in units.items() if u > LOG_UNITS}
    first, second = prefixcap.load(a / "final").state_dict(), prefixcap.load(b / "final").state_dict()
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=ATOL, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(run_dir, run_dir.parent / "cache")
    return run_dir


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_as_one_on_the_same_global_batch(single, tmp_path, launcher):
    run_dir = tmp_path / "run"
    result = train(run_dir, tmp_path / "cache", processes=2, launcher=launcher)
    assert_same_run(single, run_dir)
    # one process wrote the run directory and reported the run: each step once, one set of checkpoints
    assert steps(run_dir) == list(range(1, 25))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000018", "step-0000024"]
    assert result.stdout.count("step     24  val") == 1


def test_an_interrupted_two_process_run_resumes_to_the_same_result(single, tmp_path):
    run_dir, cache, script = tmp_path / "run", tmp_path / "cache", tmp_path / "interrupted.py"
    script.write_text(RESUME)
    result = launch(str(script), str(run_dir), *ARGS, cache=cache, processes=2)  # stops after step 9
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(run_dir) == list(range(1, 10)) and not (run_dir / "final").exists()
    result = train(run_dir, cache, processes=2)  # resumes from step 6, the last checkpoint
    assert "resume" in result.stdout
    assert_same_run(single, run_dir)


def test_the_global_batch_must_split_evenly_over_the_processes(tmp_path):
    sets = [a for arg in [*ARGS, "train.batch_size=7"] for a in ("--set", arg)]
    result = launch("-m", "prefixcap", "run", "quickstart", *sets, "--out", str(tmp_path / "run"), cache=tmp_path,
                    processes=2)  # fmt: skip
    assert result.returncode != 0
    assert "train.batch_size 7 is the global batch" in result.stdout + result.stderr
