"""train.compile: true trains the same model as eager training, for both systems, and auto compiles where it
measured faster (issue 26). The compiled forward and backward are inductor's kernels, which sum in another order than
eager's: the curves agree to a relative 1e-3 over the steps here, not bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import prefixcap
from conftest import train_quietly
from prefixcap.config import TrainConfig
from prefixcap.training import RunError, Started
from prefixcap.training.compiled import AUTO_MIN_SECONDS, AUTO_MIN_STEPS, can_compile_on_cpu, compiles

SHAPES = {"name": "shapes", "train_size": 64, "val_size": 8, "test_size": 8}
BUDGET = {"steps": 6, "batch_size": 8}
RECIPES = {
    "prefix": {"encoder": {"name": "siglip", "checkpoint": "tiny"},
               "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
               "decoder": {"name": "smollm", "checkpoint": "tiny", "finetune": "full"},
               "losses": [{"name": "caption-ce"}, {"name": "itc"}]},
    "crossattn": {"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"}},
}  # fmt: skip


@pytest.fixture
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "compile-cache"


@pytest.mark.parametrize("system", list(RECIPES))
def test_compiled_training_follows_the_eager_loss_curve(system, tmp_path: Path, cache: Path):
    curves, weights = {}, {}
    for compiled in (False, True):
        recipe = {**RECIPES[system], "data": SHAPES, "train": {**BUDGET, "compile": compiled},
                  "eval": {"every_steps": 3, "clip_model": None}, "generate": {"max_new_tokens": 12},
                  "output": {"log_every_steps": 1, "tensorboard": False}}  # fmt: skip
        result = train_quietly(recipe, [], tmp_path / str(compiled), cache)
        curves[compiled] = [row["loss"] for row in result.history]
        # what was saved is the module's own weights under their own names, which load as any run's
        weights[compiled] = prefixcap.load(tmp_path / str(compiled) / "final").state_dict()
    assert len(curves[True]) == BUDGET["steps"] and curves[True][-1] < curves[True][0]
    assert curves[True] == pytest.approx(curves[False], rel=1e-3)
    # saved under the module's own names (no torch.compile wrapper prefix): the run loads as an eager run does.
    # The weights are not compared: AdamW turns the rounding noise of near-zero gradients into whole lr-sized steps.
    assert weights[True].keys() == weights[False].keys()


def test_auto_compiles_where_it_measured_faster():
    """auto: a CPU run long enough to pay the compile back (prefixcap/training/compiled.py); as set otherwise."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().compile == "auto"
    assert compiles(TrainConfig(steps=AUTO_MIN_STEPS), cpu)
    assert not compiles(TrainConfig(steps=AUTO_MIN_STEPS - 1), cpu)
    assert not compiles(TrainConfig(steps=20_000, max_seconds=AUTO_MIN_SECONDS / 2), cpu)
    assert compiles(TrainConfig(steps=20_000, max_seconds=AUTO_MIN_SECONDS * 2), cpu)
    assert not compiles(TrainConfig(steps=20_000), cuda)  # not measured on a GPU: eager until it is
    assert compiles(TrainConfig(steps=1, compile=True), cuda) and not compiles(TrainConfig(compile=False), cpu)


@pytest.mark.parametrize("text", ["true", "yes", 1, "auto "])
def test_compile_is_a_bool_or_auto_never_a_coerced_string(text):
    with pytest.raises(ValidationError, match="compile"):
        TrainConfig(compile=text)


def test_without_a_cpp_compiler_auto_stays_eager_and_true_says_why(tmp_path: Path):
    import torch._inductor.config

    recipe = {**RECIPES["prefix"], "data": SHAPES, "train": {**BUDGET, "compile": True}}
    # inductor looks for the compilers its config names; this one does not exist
    with torch._inductor.config.patch({"cpp.cxx": ("prefixcap-no-such-c++",)}):
        assert not can_compile_on_cpu()
        assert not compiles(TrainConfig(steps=20_000), torch.device("cpu"))
        with pytest.raises(RunError, match=r"train.compile is true.*C\+\+ compiler.*train.compile: false"):
            train_quietly(recipe, [], tmp_path / "r", tmp_path / "cache")
    assert can_compile_on_cpu()
    # said before the data: no feature was cached, nothing was trained
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r" / "final").exists()


def test_a_long_cpu_run_compiles_by_default_and_says_so(tmp_path: Path, cache: Path):
    events = []
    recipe = {**RECIPES["prefix"], "data": SHAPES, "train": {**BUDGET, "steps": AUTO_MIN_STEPS},
              "eval": {"every_steps": AUTO_MIN_STEPS, "clip_model": None},
              "output": {"log_every_steps": 1, "tensorboard": False}}  # fmt: skip
    result = train_quietly(recipe, [], tmp_path / "r", cache, stop_after=2, report=events.append)
    started = next(e for e in events if isinstance(e, Started))
    assert started.compiled and started.total_steps == AUTO_MIN_STEPS
    assert [row["step"] for row in result.history] == [1, 2]
