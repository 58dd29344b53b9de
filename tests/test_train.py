"""`prefixcap run` end to end on a small shapes world (a few seconds per run on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import prefixcap
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.interfaces import DatasetSource, Example
from prefixcap.metrics.clipscore import ClipScorer
from prefixcap.data.loader import cache_features, index_split
from prefixcap.training import RunError, run

SMALL = [
    "data.name=shapes", "data.train_size=64", "data.val_size=8", "data.test_size=8",
    "train.steps=6", "train.batch_size=8", "eval.every_steps=3", "eval.batch_size=8", "output.log_every_steps=1",
    "output.save_every_steps=2", "connector.hidden=32", "generate.max_new_tokens=12",
]  # fmt: skip


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def feature_cache(shared_cache, monkeypatch):
    """One feature cache for the module (never the user's): the SMALL world is encoded once, not once a test."""
    monkeypatch.setenv("PREFIXCAP_CACHE", str(shared_cache))


def quiet(row):
    pass


def test_run_leaves_a_complete_run_directory(tmp_path):
    result = run("quickstart", SMALL, run_dir=tmp_path / "run", report=quiet)
    d = result.run_dir
    for name in ("recipe.resolved.yaml", "log.jsonl", "metrics.json", "samples.jsonl", "curves.png", "final"):
        assert (d / name).exists(), name
    assert [p.name for p in sorted((d / "checkpoints").iterdir())] == ["step-0000004", "step-0000006"]  # keep 2
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["skipped_images"] == 0 and 0 <= metrics["test_oracle_accuracy"] <= 1
    assert {"test_loss", "test_bleu4", "test_cider"} <= set(metrics)
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and "val" in log[2] and "val" in log[5]
    # final/ is a system prefixcap.load reads back, captioning the test images as the run did
    samples = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    source = ShapesSource(prefixcap.get_component("dataset", "shapes").parse_options({"test_size": 8}))
    images = [e.image for e in source.examples("test")]
    loaded = prefixcap.load(d / "final")
    assert loaded.caption(images, max_new_tokens=12) == [s["caption"] for s in samples]
    # CLIPScore with the bundled shapes CLIP: per image in samples.jsonl, the means in metrics.json
    expected = ClipScorer.from_pretrained("prefixcap/shapes-clip").score(
        images, [s["caption"] for s in samples], [s["references"] for s in samples])
    assert [s["clip_s"] for s in samples] == pytest.approx(expected.per_image_clip_s, abs=1e-4)
    assert [s["ref_clip_s"] for s in samples] == pytest.approx(expected.per_image_ref_clip_s, abs=1e-4)
    assert metrics["test_clip_s"] == pytest.approx(expected.clip_s, abs=1e-5)
    assert metrics["test_ref_clip_s"] == pytest.approx(expected.ref_clip_s, abs=1e-5)
    assert "clip_s" in log[2]["val"]


def test_clipscore_model_is_loaded_before_training_and_can_be_switched_off(tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(RunError, match=f"{missing}.*set it to null to skip CLIPScore"):
        run("quickstart", [*SMALL, f"eval.clip_model={missing}"], run_dir=tmp_path / "a", report=quiet)
    assert not (tmp_path / "a" / "checkpoints").exists()  # failed in seconds, before any step
    result = run("quickstart", [*SMALL, "eval.clip_model=null", "train.steps=2"], run_dir=tmp_path / "b", report=quiet)
    assert "test_loss" in result.metrics and not any("clip_s" in k for k in result.metrics)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    # Dropout draws from torch's RNG every step, so anything else that draws from it (a DataLoader starting, say)
    # would make the resumed run's masks differ from the uninterrupted run's.
    args = [*SMALL, "connector.dropout=0.2"]
    full = run("quickstart", args, run_dir=tmp_path / "full", report=quiet)
    partial = run("quickstart", args, run_dir=tmp_path / "resumed", stop_after=3, report=quiet)
    assert partial.steps == 3 and not (tmp_path / "resumed" / "final").exists()
    resumed = run("quickstart", args, run_dir=tmp_path / "resumed", report=quiet)  # picks up step-0000002
    assert resumed.metrics == full.metrics
    def log(name):  # everything but the timings
        rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "data_images_per_s", "train_s")} for r in rows]

    assert log("resumed") == log("full")
    a = prefixcap.load(tmp_path / "full" / "final").state_dict()
    b = prefixcap.load(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_features_give_the_same_loss_curve(tmp_path):
    in_loop = run("quickstart", [*SMALL, "train.cache_features=false"], run_dir=tmp_path / "loop", report=quiet)
    exact = run("quickstart", [*SMALL, "train.cache_dtype=fp32"], run_dir=tmp_path / "fp32", report=quiet)
    half = run("quickstart", [*SMALL, "train.cache_dtype=fp16"], run_dir=tmp_path / "fp16", report=quiet)
    assert len(list((Path(os.environ["PREFIXCAP_CACHE"]) / "features").glob("*/done.json"))) >= 2
    loop = [r["loss"] for r in in_loop.history]
    assert [r["loss"] for r in exact.history] == pytest.approx(loop, rel=1e-4)
    # fp16 rounds each feature by at most 2^-11 of itself: the curve moves in the fourth digit, not the second
    assert [r["loss"] for r in half.history] == pytest.approx(loop, rel=2e-3)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = Image.new("RGB", (16, 16), "red")

    class Mixed(DatasetSource):
        def examples(self, split):
            yield Example(good, ["a red square"])
            yield Example(broken, ["a broken file"])
            yield Example(str(tmp_path / "missing.jpg"), ["a missing file"])
            yield Example(good, ["  "])  # no usable caption
            yield Example(good, ["a red square again"])

    split = index_split(Mixed(), "train")  # a source that can only be iterated: spooled to Arrow, then indexed
    assert split.kept.tolist() == [0, 1, 2, 4] and split.skipped == 1  # the uncaptioned one, found without decoding
    cache_features(prefixcap.compose("quickstart"), split, num_workers=0)  # the broken two, found by encoding
    assert split.kept.tolist() == [0, 4] and split.skipped == 3


def test_run_needs_data_and_a_writable_directory(tmp_path):
    with pytest.raises(RunError, match="no data section"):
        run("quickstart", ["data=null"], run_dir=tmp_path / "x", report=quiet)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunError, match="is not writable"):
        run("quickstart", SMALL, run_dir=blocker / "run", report=quiet)


def test_the_crossattn_baseline_trains_through_the_same_run(tmp_path):
    recipe = {"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"},
              "data": {"name": "shapes", "train_size": 32, "val_size": 4, "test_size": 4},
              "train": {"steps": 3, "batch_size": 8}, "generate": {"max_new_tokens": 6}}  # fmt: skip
    result = run(recipe, run_dir=tmp_path / "run", report=quiet)
    assert result.steps == 3 and "test_oracle_accuracy" in result.metrics
    assert type(prefixcap.load(tmp_path / "run" / "final")).__name__ == "CrossAttnSystem"


def test_early_stopping_keeps_the_best_checkpoint_and_stays_stopped(tmp_path):
    # higher_is_better on the loss: the first evaluation is the best, the next one exhausts patience 0
    args = [*SMALL, "train.steps=12", "eval.every_steps=2", "output.save_every_steps=1", "eval.patience=0",
            "eval.higher_is_better=true"]  # fmt: skip
    first = run("quickstart", args, run_dir=tmp_path / "run", report=quiet)
    assert first.steps == 4 and first.metrics["best_step"] == 2
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000003", "step-0000004"]  # the last two, and the best
    again = run("quickstart", args, run_dir=tmp_path / "run", report=quiet)  # resumed: stays stopped
    assert again.steps == 4 and again.metrics == first.metrics


def flickr8k_layout(directory: Path) -> Path:
    """A small local set laid out as jxie/flickr8k is (image, caption_0 ... caption_4; train/validation/test)."""
    import datasets

    splits = {}
    for split, name, n in (("train", "train", 16), ("val", "validation", 4), ("test", "test", 4)):
        rows: dict[str, list] = {"image": [], **{f"caption_{i}": [] for i in range(5)}}
        for example in ShapesSource(ShapesOptions(**{f"{split}_size": n})).examples(split):
            rows["image"].append(example.image)
            for i in range(5):
                rows[f"caption_{i}"].append(example.captions[i % len(example.captions)])
        splits[name] = datasets.Dataset.from_dict(rows, features=datasets.Features(
            {"image": datasets.Image(), **{f"caption_{i}": datasets.Value("string") for i in range(5)}}))
    datasets.DatasetDict(splits).save_to_disk(str(directory))
    return directory


@pytest.mark.parametrize("recipe", ["siglip-smollm135", "crossattn-vit-distilgpt2"])
def test_real_size_recipes_train_with_tiny_local_checkpoints_swapped_in(recipe, tmp_path):
    """The real recipes, unchanged but for --set: tiny checkpoints written locally in each library's format and a
    small shapes set stand in for the hub weights and the hub dataset a user with internet would train on."""
    from prefixcap.decoders.causal_lm import CausalLMDecoder
    from prefixcap.encoders.siglip import SiglipEncoder
    from prefixcap.systems.crossattn import CrossAttnSystem

    if recipe == "siglip-smollm135":
        enc = SiglipEncoder.write_tiny_checkpoint(tmp_path / "siglip")["checkpoint"]
        dec_options = prefixcap.get_component("decoder", "smollm").parse_options({})
        dec = CausalLMDecoder.write_tiny_checkpoint(tmp_path / "smollm", dec_options)["checkpoint"]
        swaps = [f"encoder.checkpoint={enc}", f"decoder.checkpoint={dec}"]
    else:
        tiny = CrossAttnSystem.write_tiny_checkpoint(tmp_path / "crossattn")
        swaps = [f"system.encoder={tiny['encoder']}", f"system.decoder={tiny['decoder']}"]
    budget = ["train.steps=2", "train.batch_size=4", "generate.max_new_tokens=4"]
    data = [f"data.path={flickr8k_layout(tmp_path / 'f8k')}"]  # the recipe's own columns and split names
    data.append("eval.clip_model=prefixcap/shapes-clip")  # the images are shapes; CLIP B/32 is on the hub
    result = run(recipe, swaps + data + budget, run_dir=tmp_path / "run", report=quiet)
    assert result.steps == 2 and {"test_loss", "test_bleu4", "test_cider", "test_clip_s"} <= set(result.metrics)
    assert result.metrics["train_examples"] == 16
    assert prefixcap.load(tmp_path / "run" / "final").recipe.train.precision == "bf16"  # the recipe's own setting


def test_runs_with_different_precisions_share_one_process(tmp_path):
    """Each run computes in the precision its recipe asks for, even after a run with another one in the same process
    (accelerate's process-wide setting must not pin the first run's choice on every later run)."""
    from prefixcap.training import start

    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        args = [*SMALL, f"train.precision={precision}", "train.grad_accum=2", "train.steps=2"]
        with start("quickstart", args, run_dir=tmp_path / precision, report=quiet) as trainer:
            seen = set()  # dtypes of the decoder's first projection's outputs while training
            layer = next(m for m in trainer.system.decoder.modules() if isinstance(m, torch.nn.Linear))
            hook = layer.register_forward_hook(lambda module, args, out: seen.add(out.dtype) if module.training else None)
            trainer.fit(report=quiet)
            hook.remove()
        assert seen == {dtype}, precision
        assert (trainer.scaler is not None) == (precision == "fp16")  # fp16 overflows without loss scaling
        assert all(p.dtype == torch.float32 for p in trainer.system.parameters())  # autocast: fp32 master weights
        assert trainer.step == 2 and all(math.isfinite(r["loss"]) for r in trainer.history)


def test_tensorboard_gets_every_logged_scalar_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*SMALL, "output.tensorboard=true"]
    run("quickstart", args, run_dir=tmp_path / "run", stop_after=3, report=quiet)
    result = run("quickstart", args, run_dir=tmp_path / "run", report=quiet)  # from step 2: logs step 3 again
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/loss", "val/oracle_accuracy", "val/cider"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]  # the interrupted run's step 3 is replaced, not repeated
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in result.history], rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]


def test_tensorboard_is_optional_unless_asked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(RunError, match="output.tensorboard is true but the tensorboard package is not installed"):
        run("quickstart", [*SMALL, "output.tensorboard=true"], run_dir=tmp_path / "asked", report=quiet)
    result = run("quickstart", [*SMALL, "train.steps=2"], run_dir=tmp_path / "default", report=quiet)
    assert result.steps == 2 and not (tmp_path / "default" / "tensorboard").exists()


def test_a_wall_clock_budget_ends_training_and_still_evaluates(tmp_path):
    # A budget smaller than any step: the run takes one step, evaluates it as its last, and writes final/.
    result = run("quickstart", [*SMALL, "train.steps=50", "train.max_seconds=1e-6"], run_dir=tmp_path / "r",
                 report=quiet)  # fmt: skip
    assert result.steps == 1 and (tmp_path / "r" / "final").exists() and "test_loss" in result.metrics
    (row,) = result.history
    assert "val" in row and row["train_s"] > 0


def test_feature_cache_key_hashes_encoders_with_batchnorm_counters():
    # BatchNorm keeps a 0-dim num_batches_tracked buffer; the key must hash it (EfficientNet-style encoders have it).
    from types import SimpleNamespace

    from prefixcap.data.cache import encoder_digest

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    encoder = SimpleNamespace(state_dict=net.state_dict, preprocessing="processor")
    key = encoder_digest(encoder)
    net[1].num_batches_tracked += 1
    assert encoder_digest(encoder) != key


SPOOLER = """
    import os, sys
    from prefixcap.data.loader import index_split
    from prefixcap.interfaces import DatasetSource, Example
    from PIL import Image

    class Once(DatasetSource):  # a source that can only be iterated: spooled
        def examples(self, split):
            yield Example(Image.new("RGB", (8, 8), "red"), ["a red square"])

    split = index_split(Once(), "train")
    print(len(split), flush=True)
    os._exit(0)  # as a kill would: no finalizer runs, the spool stays
"""


def test_a_spool_left_by_a_killed_process_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    import subprocess
    import textwrap

    from conftest import REPO

    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SPOOLER)], capture_output=True, text=True,
                          env={**os.environ, "PREFIXCAP_CACHE": str(tmp_path / "cache")}, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]
    spool = tmp_path / "cache" / "spool"
    (dead,) = list(spool.iterdir())
    os.utime(dead / ".owner", (0, 0))  # older than a directory still being created

    class Once(DatasetSource):
        def examples(self, split):
            yield Example(Image.new("RGB", (8, 8), "blue"), ["a blue square"])

    live = index_split(Once(), "train")  # spools too, and sweeps first
    assert not dead.exists() and len(list(spool.iterdir())) == 1
    os.utime(next(spool.iterdir()) / ".owner", (0, 0))
    again = index_split(Once(), "train")  # a live process's spool is kept however old
    assert len(list(spool.iterdir())) == 2 and live.references(0) == again.references(0) == ["a blue square"]
