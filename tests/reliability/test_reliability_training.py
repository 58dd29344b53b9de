"""Interrupted and failing training runs lose nothing: signals, SIGKILL at random steps, a diverged loss, a full
disk, a read-only run directory, and two runs on one directory. Every run here is a real `prefixcap run` process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import prefixcap
from prefixcap.training import RunError, latest_checkpoint, run
from prefixcap.training import start as start_run

from conftest import REPO

PREFIXCAP = Path(sys.executable).with_name("prefixcap")
# A 40-step run of the quickstart system on a small shapes world: a few seconds, a checkpoint after every step
# (so that a SIGKILL lands in the middle of writing one as often as between them).
SMALL = [
    "data.name=shapes", "data.train_size=64", "data.val_size=8", "data.test_size=8",
    "train.steps=40", "train.batch_size=8", "eval.every_steps=20", "eval.batch_size=8", "output.log_every_steps=1",
    "output.save_every_steps=1", "output.keep_last=3", "connector.hidden=32", "generate.max_new_tokens=12",
    "output.tensorboard=false",
]  # fmt: skip
SEED = int(os.environ.get("PREFIXCAP_RELIABILITY_SEED", "20261123"))


def command(run_dir: Path, *extra: str) -> list[str]:
    return [str(PREFIXCAP), "run", "quickstart", "--out", str(run_dir), *[f"--set={s}" for s in SMALL], *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    # One thread: steps take the same time whatever else runs on the machine, and two threads on a busy 2-core
    # machine spin-wait for each other.
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PREFIXCAP_CACHE": str(cache), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def start(run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)  # fmt: skip


def wait_for_step(process: subprocess.Popen, step: int) -> None:
    """Read the run's output until it has logged ``step`` (lines read "step      N  loss ...")."""
    # A run that hangs without a word would block this read for ever: killed after 300 s, it ends the loop below.
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            words = line.split()
            if len(words) > 2 and words[0] == "step" and words[2] == "loss" and int(words[1]) >= step:
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"the run ended before step {step}: {process.wait(timeout=60)} {process.stderr.read()}")


def finish(run_dir: Path, env: dict[str, str]) -> dict:
    done = subprocess.run(command(run_dir), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resume" in done.stdout  # it picked up a checkpoint rather than starting again
    return json.loads((run_dir / "metrics.json").read_text())


def assert_only_complete_checkpoints(run_dir: Path) -> None:
    """Every checkpoints/step-N is whole (its manifest lists files that exist, its state file parses, its tensors
    load); anything else there is a temporary a later run sweeps."""
    for path in (run_dir / "checkpoints").glob("step-*"):
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["step"] == int(path.name.split("-")[1])
        manifest = json.loads((path / "system" / "manifest.json").read_text())
        for slot, names in manifest["files"].items():
            for name in names:
                assert (path / "system" / slot / name).is_file(), (path, slot, name)
        from safetensors.torch import load_file

        assert load_file(str(path / "optimizer.safetensors"))
    strays = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(("step-", "."))]
    assert not strays


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(command(run_dir), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_step_writes_a_checkpoint_and_the_run_resumes_to_the_same_result(sig, tmp_path, env,
                                                                                              uninterrupted):  # fmt: skip
    run_dir = tmp_path / "run"
    process = start(run_dir, env)
    wait_for_step(process, 5)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr  # as the shell reports a process that signal ended
    assert "Traceback" not in stderr
    interrupted_at = int(stderr.split("after step ")[1].split(";")[0])
    assert f"interrupted by {sig.name} after step {interrupted_at}; checkpoint" in stderr
    assert "run the same command again to resume" in stderr
    assert latest_checkpoint(run_dir).name == f"step-{interrupted_at:07d}"
    assert_only_complete_checkpoints(run_dir)
    assert not (run_dir / "final").exists()
    if sig == signal.SIGINT:  # (resuming after SIGKILL, below, shows the same for any way a run ends)
        assert finish(run_dir, env) == uninterrupted


def test_sigkill_at_random_steps_leaves_only_complete_checkpoints_and_resume_matches(tmp_path, env, uninterrupted):
    rng = random.Random(SEED)
    run_dir = tmp_path / "run"
    kills = []
    for _ in range(3):
        process = start(run_dir, env)
        step = rng.randrange(2, 36)
        wait_for_step(process, step)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere in the next step, its checkpoint write included
        process.kill()
        process.wait(timeout=60)
        kills.append(step)
        assert_only_complete_checkpoints(run_dir)
    system = prefixcap.load(latest_checkpoint(run_dir) / "system")  # what a kill left is a system that loads
    assert all(torch.isfinite(p).all() for p in system.parameters())
    print(f"SIGKILL after steps {kills} (seed {SEED})")
    assert finish(run_dir, env) == uninterrupted
    assert not [p for p in run_dir.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]  # swept on resume


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    overrides = [*SMALL, "train.warmup_steps=1", "train.max_grad_norm=null"]
    with pytest.raises(RunError, match=r"loss is nan at step 2; stopping. Last good checkpoint: .*step-0000001"):
        run("quickstart", [*overrides, "train.lr=1e30"], run_dir=tmp_path / "nan", report=lambda row: None)
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()] == ["step-0000001"]
    assert_only_complete_checkpoints(tmp_path / "nan")
    # Weights that are no longer finite (a NaN gradient can come with a finite loss) are never saved.
    quiet = lambda row: None  # noqa: E731
    with start_run("quickstart", [*overrides, "train.lr=1e-3"], run_dir=tmp_path / "inf", report=quiet) as trainer:
        trainer.fit(stop_after=1, report=lambda row: None)
        next(p for p in trainer.system.parameters() if p.requires_grad).data[0] = float("inf")
        with pytest.raises(RunError, match=r"weights are not finite after step 1 .*not saving them.*step-0000001"):
            trainer.save_checkpoint()
    assert [p.name for p in (tmp_path / "inf" / "checkpoints").iterdir()] == ["step-0000001"]


# Defined for every confined script: the tmpfs filled to the last byte, by a file the block may shrink to make room.
FILLED_DISK = """
import contextlib


@contextlib.contextmanager
def filled_disk(path):
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as e:
            print("filled:", e.strerror)
        yield f
"""


def confined(script: str, mount: str, directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a Python ``script`` with ``directory`` really mounted read-only (mount="ro") or as a 64 MiB disk
    (mount="tmpfs"), in a private mount namespace (unshare -m) that ends with the script. The script may call
    ``filled_disk(path)`` (``FILLED_DISK``).

    Root (CI) makes the namespace directly. Another user makes it inside a user namespace of its own (unshare -r),
    where it may mount too, so both get the same file systems and the same errors. A file mode or a file-size limit
    would only imitate them (root ignores a mode; a size limit fails every write, not only those a full disk has no
    room for). A machine that allows neither cannot run these tests, and they fail saying so."""
    code = [sys.executable, "-c", FILLED_DISK + textwrap.dedent(script)]
    mounts = {"ro": f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory}",
              "tmpfs": f"mount -t tmpfs -o size=64m tmpfs {directory}"}  # fmt: skip
    shell = f"{mounts[mount]} && exec \"$@\""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    done = subprocess.run([*unshare, "sh", "-c", shell, "sh", *code], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert "unshare:" not in done.stderr and "mount:" not in done.stderr, (
        f"cannot mount {mount} on {directory} (needs root or user namespaces): {done.stderr}")
    return done


def test_a_read_only_run_directory_is_refused_before_training_and_its_checkpoints_stay(tmp_path, env):
    run_dir = tmp_path / "readonly" / "run"
    done = subprocess.run(command(run_dir, "--set=train.steps=3"), capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    script = f"""
        import subprocess, sys
        done = subprocess.run({command(run_dir, "--set=train.steps=6")!r}, capture_output=True, text=True,
                              timeout=240)
        print(done.returncode)
        print(done.stdout)
        print(done.stderr, file=sys.stderr)
    """
    done = confined(script, "ro", tmp_path / "readonly", env)
    code, stdout = done.stdout.split("\n", 1)
    assert code == "2", done.stderr
    assert f"error: run directory {run_dir} is not writable: Read-only file system" in done.stderr
    assert "Traceback" not in done.stderr and "loss" not in stdout  # refused before any step
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_run_resumes(tmp_path, env):
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir, empty_dir = disk / "run", disk / "empty"
    script = f"""
        import os
        from pathlib import Path
        from prefixcap.training import RunError, latest_checkpoint, run

        overrides = {[*SMALL, "train.steps=8"]!r}
        run("quickstart", overrides, run_dir={str(run_dir)!r}, stop_after=3, report=lambda row: None)
        def attempt(directory={str(run_dir)!r}):
            try:
                run("quickstart", overrides, run_dir=directory, report=lambda row: None)
            except RunError as e:
                print("RunError:", e)

        os.mkdir({str(empty_dir)!r})  # made while there is room: its .lock must be written on the full disk
        with filled_disk({str(disk / "filler")!r}) as f:
            attempt()  # refused before training
            attempt({str(empty_dir)!r})  # likewise, with no .lock there yet
            f.truncate(f.tell() - 64_000)  # room for the logs, not for a checkpoint
            attempt()  # step 4's checkpoint cannot be written
        os.remove({str(disk / "filler")!r})
        print("latest:", latest_checkpoint(Path({str(run_dir)!r})).name)
        result = run("quickstart", overrides, run_dir={str(run_dir)!r}, report=lambda row: None)
        print("resumed to step", result.steps, "of", len(result.history), "logged")
    """
    done = confined(script, "tmpfs", disk, env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "filled: No space left on device" in lines
    full, empty, error = [line for line in lines if line.startswith("RunError:")]
    assert f"run directory {run_dir} is not writable: No space left on device" in full
    assert f"run directory {empty_dir} is not writable: No space left on device" in empty
    assert "cannot write checkpoint" in error and "step-0000004" in error and "No space left on device" in error
    assert "the previous checkpoint" in error and "step-0000003) is intact" in error
    assert "latest: step-0000003" in lines  # the failed step-4 left nothing where a checkpoint is looked for
    assert "resumed to step 8 of 8 logged" in lines


def test_two_runs_on_one_directory_cannot_interleave(tmp_path, env, monkeypatch):
    """The first run is this test's process: start() takes the directory's lock and holds it until the block ends,
    so the second run meets a live run however long it takes to start."""
    monkeypatch.setenv("PREFIXCAP_CACHE", env["PREFIXCAP_CACHE"])
    run_dir = tmp_path / "run"
    with start_run("quickstart", SMALL, run_dir=run_dir, report=lambda row: None) as first:
        first.fit(stop_after=1, report=lambda row: None)  # a checkpoint the second run would resume from
        files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        second = subprocess.run(command(run_dir), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"run directory {run_dir} is in use by another prefixcap run (pid {os.getpid()})" in second.stderr
        assert "loss" not in second.stdout and "Traceback" not in second.stderr
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # the live run's, untouched
    # --fresh will not delete a directory that is not a run's
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    refused = subprocess.run([*command(other), "--fresh"], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=300)  # fmt: skip
    assert refused.returncode == 2 and "--fresh would delete" in refused.stderr
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]
    assert (other / "thesis.tex").read_text() == "years of work"


def test_a_recipe_file_cannot_write_outside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = tmp_path / "elsewhere"
    recipe = work / "stranger.yaml"
    for place in (str(target), "../elsewhere", "runs/../../elsewhere"):
        recipe.write_text((REPO / "recipes" / "quickstart.yaml").read_text() + f"output:\n  dir: {place}\n")
        with pytest.raises(RunError, match=f"output.dir '{place}' leaves the working directory.*--out DIR"):
            run(str(recipe), SMALL, report=lambda row: None)
    assert not target.exists()
    # the place chosen by the user (--out, --set output.dir=...) is theirs to choose
    chosen = run(str(recipe), [*SMALL, "train.steps=1", f"output.dir={target}"], report=lambda row: None)
    assert chosen.run_dir == target and (target / "metrics.json").exists()
    inside = run(str(recipe), [*SMALL, "train.steps=1"], run_dir=work / "runs" / "x", report=lambda row: None)
    assert (inside.run_dir / "metrics.json").exists()



def test_fresh_deletes_only_what_a_run_wrote(tmp_path, monkeypatch):
    """A stranger's recipe with output.dir "." (or src, .git): its first run writes recipe.resolved.yaml there, which
    the old guard took for proof that the whole directory was a run's; --fresh then deleted every file in it."""
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('years of work')")
    (work / ".git").mkdir()
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main")
    monkeypatch.chdir(work)
    recipe = work / "dot.yaml"
    recipe.write_text((REPO / "recipes" / "quickstart.yaml").read_text() + "output:\n  dir: .\n")
    first = run(str(recipe), [*SMALL, "train.steps=2"], stop_after=1, report=lambda event: None)
    assert first.run_dir == Path(".") and (work / "recipe.resolved.yaml").exists()
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match=r"--fresh would delete .*holds files no run wrote \(\.git, dot\.yaml, src\)"):
        run(str(recipe), [*SMALL, "train.steps=2"], fresh=True, report=lambda event: None)
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before  # nothing lost, not even the run's
    # a directory holding only what runs write starts over, and keeps the directory itself
    runs = work / "runs" / "only"
    done = run(str(recipe), [*SMALL, "train.steps=1"], run_dir=runs, report=lambda event: None)
    assert (runs / "final").is_dir() and done.steps == 1
    again = run(str(recipe), [*SMALL, "train.steps=1"], run_dir=runs, fresh=True, report=lambda event: None)
    assert again.steps == 1 and len(again.history) == 1 and (runs / "metrics.json").exists()


def test_fresh_waits_for_the_live_run_it_would_delete(tmp_path, monkeypatch):
    """The lock used to be taken only without --fresh: the live run's directory was deleted under it, and the new
    run resumed from a checkpoint the old one went on writing into it."""
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    with start_run("quickstart", SMALL, run_dir=run_dir, report=lambda event: None) as live:
        live.fit(stop_after=1, report=lambda event: None)
        files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        with pytest.raises(RunError, match=f"run directory {run_dir} is in use by another prefixcap run"):
            run("quickstart", SMALL, run_dir=run_dir, fresh=True, report=lambda event: None)
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
