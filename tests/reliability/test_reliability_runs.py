"""Training runs, recipes and the feature cache against hostile files and unlucky users: a symlinked output.dir,
terminal escapes in a recipe, a feature cache that lies about its shape or was killed mid-write, a disk that fills
while final/ is written, Ctrl-C during the final evaluation, and a step accumulated over very many micro-batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from prefixcap import compose, create
from prefixcap.data.cache import _ShardWriter
from prefixcap.data.loader import cache_features, index_split

from conftest import REPO, run_cli
from test_reliability_training import SMALL, confined

PREFIXCAP = Path(sys.executable).with_name("prefixcap")
TINY = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": {"name": "mlp", "hidden": 32},
        "decoder": {"name": "smollm", "checkpoint": "tiny"}}  # fmt: skip


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "PREFIXCAP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def start(run_dir: Path, env: dict[str, str], *settings: str) -> subprocess.Popen:
    args = [str(PREFIXCAP), "run", "quickstart", "--out", str(run_dir), *[f"--set={s}" for s in [*SMALL, *settings]]]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def wait_for_line(process: subprocess.Popen, wanted) -> str:
    """Read the run's output until a line satisfies ``wanted``; returns it."""
    watchdog = threading.Timer(300, process.kill)  # a silent hang would block the read for ever
    watchdog.start()
    try:
        for line in process.stdout:
            if wanted(line):
                return line
    finally:
        watchdog.cancel()
    raise AssertionError(f"the run ended first: {process.wait(timeout=60)} {process.stderr.read()}")


# 1 ------------------------------------------------------------------------------------------------------------------


def test_a_recipe_output_dir_through_a_symlink_that_leaves_the_working_directory_is_refused(tmp_path, env):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "runs").symlink_to(elsewhere)  # reads as inside; writes land outside
    recipe = work / "stranger.yaml"
    recipe.write_text((REPO / "recipes" / "quickstart.yaml").read_text() + "output:\n  dir: runs/{recipe}\n")
    done = run_cli("run", str(recipe), *[f"--set={s}" for s in SMALL], "--set=train.steps=1", env=env, cwd=work)
    assert done.returncode == 2, done.stderr
    assert "output.dir 'runs/{recipe}' leaves the working directory" in done.stderr
    assert f"(it resolves to {elsewhere / 'stranger'})" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(elsewhere.iterdir()) == []  # nothing written through the link


# 2 ------------------------------------------------------------------------------------------------------------------

HOSTILE = "[bold red]x[/] \x1b]0;pwned\x07 \x1b[2J"


def test_recipe_names_and_descriptions_reach_the_terminal_as_text(tmp_path, env):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    name = "evil\x1b[2J[bold]b"  # a file name holds anything but / and NUL
    recipe = recipes / f"{name}.yaml"
    text = (REPO / "recipes" / "quickstart.yaml").read_text().split("\n", 1)[1]
    recipe.write_text(f"description: {json.dumps(HOSTILE)}\n{text}")
    env = {**env, "PREFIXCAP_RECIPES": str(recipes)}
    listed = run_cli("recipes", env=env, cwd=tmp_path)
    validated = run_cli("validate", str(recipe), env=env, cwd=tmp_path)
    trained = run_cli("run", str(recipe), *[f"--set={s}" for s in SMALL], "--set=train.steps=1",
                      "--set=eval.metric=[red]m[/]\x1b[2J", env=env, cwd=tmp_path)  # fmt: skip
    for done in (listed, validated, trained):
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout + done.stderr
    assert "[bold red]x[/]" in listed.stdout and "\\x1b]0;pwned\\x07" in listed.stdout
    assert "evil\\x1b[2J[bold]b" in listed.stdout
    assert "evil\\x1b[2J[bold]b" in unwrapped(validated.stdout)  # in the table's title
    assert "runs/evil\\x1b[2J[bold]b" in unwrapped(trained.stdout)  # the run directory in the closing table's title


def unwrapped(text: str) -> str:
    """A table title as one line again (rich wraps a long one)."""
    return text.replace("\n", "")


# 3 ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


def test_a_cache_that_loads_but_has_the_wrong_shape_is_rebuilt(cache):
    system = compose(TINY)
    source = create("dataset", "shapes", {"train_size": 12, "image_size": 32})
    first = cache_features(system, index_split(source, "train"), num_workers=0)
    directory = first.directory
    for shard in directory.glob("shard-*"):
        shard.unlink()
    # A complete cache in its own terms (a consistent done.json and shard), not the one its key promises.
    writer = _ShardWriter(directory / "shard-00000.safetensors", 3, (1, 4), torch.float16)
    writer.write([torch.ones(1, 4)] * 3)
    writer.close()
    (directory / "done.json").write_text(json.dumps({"rows": 3, "rows_per_shard": 3, "shape": [1, 4],
                                                     "dtype": "fp16", "format": "features-1"}))  # fmt: skip
    split = index_split(source, "train")
    with pytest.warns(UserWarning, match="does not hold what its key promises.*rebuilding"):
        again = cache_features(system, split, num_workers=0)
    assert again.encoded == 12 and again.directory == directory
    assert split.features.read(range(12)).shape == (12, system.encoder.num_tokens, system.encoder.dim)


KILLED_BUILDER = """
    import os, signal
    import torch
    from prefixcap import compose, create
    from prefixcap.data.loader import cache_features, index_split

    torch.manual_seed(0)  # the test's encoder: the same random weights, the same cache key
    system = compose({tiny!r})
    source = create("dataset", "shapes", {{"train_size": 12, "image_size": 32}})
    original = system.encoder.forward
    calls = []
    def encode(pixels):
        calls.append(1)
        if len(calls) == 2:  # half the shard is in its temporary file
            os.kill(os.getpid(), signal.SIGKILL)
        return original(pixels)
    system.encoder.forward = encode
    cache_features(system, index_split(source, "train"), num_workers=0, batch_size=4)
"""


def test_a_killed_builders_temporary_is_swept_by_the_next_build(cache, tmp_path):
    script = textwrap.dedent(KILLED_BUILDER.format(tiny=TINY))
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PREFIXCAP_CACHE": str(cache.parent)},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (directory,) = [p for p in cache.iterdir() if p.is_dir()]
    (stale,) = directory.glob(".shard-*.tmp-*")
    torch.manual_seed(0)
    system = compose(TINY)
    source = create("dataset", "shapes", {"train_size": 12, "image_size": 32})
    built = cache_features(system, index_split(source, "train"), num_workers=0)
    assert built.encoded == 12
    assert not stale.exists() and not list(directory.glob(".*.tmp-*"))


# 4 ------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_final_is_a_clear_error_and_the_run_resumes(tmp_path, env):
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    script = f"""
        import os
        from prefixcap.training import RunError, run, start

        overrides = {[*SMALL, "train.steps=2"]!r}
        with start("quickstart", overrides, run_dir={str(run_dir)!r}, report=lambda row: None) as trainer:
            trainer.fit(report=lambda row: None)  # its last checkpoint is written
            with filled_disk({str(disk / "filler")!r}):
                try:
                    trainer.finish()
                except RunError as e:
                    print("RunError:", e)
        os.remove({str(disk / "filler")!r})
        result = run("quickstart", overrides, run_dir={str(run_dir)!r}, report=lambda row: None)
        print("finished at step", result.steps, "final" if os.path.isdir({str(run_dir / "final")!r}) else "none")
    """
    done = confined(script, "tmpfs", disk, env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "filled: No space left on device" in lines
    (error,) = [line for line in lines if line.startswith("RunError:")]
    assert f"cannot write {run_dir / 'final'}: " in error and "No space left on device" in error
    assert "step-0000002) is intact" in error
    assert "finished at step 2 final" in lines  # resumed at its last checkpoint and wrote final/


# 5 ------------------------------------------------------------------------------------------------------------------


def test_ctrl_c_during_the_final_evaluation_exits_130_and_the_run_resumes(tmp_path, env):
    run_dir = tmp_path / "run"
    # a short run with a long held-out evaluation: the interrupt lands in it
    process = start(run_dir, env, "train.steps=2", "data.test_size=3000", "generate.max_new_tokens=24")
    wait_for_line(process, lambda line: line.split()[:3] == ["step", "2", "val"])
    time.sleep(3)  # past the last checkpoint, into the test split
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    assert "interrupted by SIGINT after step 2; checkpoint" in stderr
    assert "run the same command again to resume" in stderr
    assert not (run_dir / "final").exists() and not (run_dir / "metrics.json").exists()


# 6 ------------------------------------------------------------------------------------------------------------------


def test_grad_accum_is_bounded_and_sigint_stops_a_long_accumulated_step(tmp_path, env):
    refused = run_cli("validate", "quickstart", "--set=train.grad_accum=1000000000", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "train.grad_accum" in refused.stderr and "less than or equal to 1024" in refused.stderr
    run_dir = tmp_path / "run"
    process = start(run_dir, env, "train.grad_accum=1024", "output.save_every_steps=null")
    wait_for_line(process, lambda line: line.startswith("feature cache"))
    time.sleep(5)  # well into step 1's 1024 micro-batches
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("SIGINT did not stop the accumulated step within 30 s") from None
    assert process.returncode == 130, stderr
    assert time.monotonic() - sent < 30
    assert "interrupted by SIGINT after step 0" in stderr and "Traceback" not in stderr
    assert "loss" not in stdout  # step 1 never completed
    assert not list(run_dir.glob("checkpoints/step-*"))  # nothing half-done was saved
