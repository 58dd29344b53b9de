"""`prefixcap run` learns, and learns from the right pairs.

Each system trains on 2,000 shapes images for 300 steps (the bundled recipes, shortened) and must cut its training
loss by at least half and state most of the 200 held-out scenes exactly. The control trains the same recipe on the
same images with every training caption moved to another image (val and test keep their true captions): it learns
the captions' language but no scene. So a trainer that does not update the weights (a zero learning rate, frozen
parameters) or that pairs an image with another's caption (the data path, about to be streamed through worker
processes, is where that bug would come from) fails here.

Measured on the 2-core CPU: quickstart 91.5% of held-out scenes exact after 300 steps, from JSONL files the same
losses to the bit; the cross-attention baseline 75.5%; both controls 0%, with a held-out loss 4x the real runs'.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource, parse_caption

from conftest import QUICKSTART_SHORT, train_quietly

pytestmark = pytest.mark.xdist_group("quickstart-short")  # one worker trains the shared quickstart, once

QUICKSTART_ACCURACY = 0.85  # exact scenes, held out, after 300 steps
CROSSATTN_ACCURACY = 0.65  # the baseline learns more slowly on this world (README: 85.5% after 2,000 steps)
CONTROL_ACCURACY = 0.05  # chance of stating a scene exactly without looking is far below this
CONTROL_LOSS_RATIO = 3.0  # the control's held-out loss is at least this many times the real run's


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The quickstart's shapes data (same seed and sizes) as PNG files with JSONL indexes: train.jsonl,
    shuffled.jsonl (each training image given the captions of the image half the set away), val.jsonl, test.jsonl."""
    root = tmp_path_factory.mktemp("shapes-files")
    source = ShapesSource(ShapesOptions(train_size=2000, val_size=50, test_size=200))
    for split in ("train", "val", "test"):
        (root / split).mkdir()
        rows = []
        for i, example in enumerate(source.examples(split)):
            example.image.save(root / split / f"{i:05d}.png")
            rows.append({"image": f"{split}/{i:05d}.png", "captions": example.captions})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if split == "train":
            half = len(rows) // 2  # a rotation: no image keeps its own captions
            moved = [{"image": r["image"], "captions": rows[(i + half) % len(rows)]["captions"]}
                     for i, r in enumerate(rows)]  # fmt: skip
            (root / "shuffled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moved))
    return root


def jsonl(files: Path, train: str) -> list[str]:
    """Overrides that read the data from the files instead of the shapes source (CLIPScore by the shapes CLIP)."""
    data = {"name": "jsonl", "train": str(files / train), "val": str(files / "val.jsonl"),
            "test": str(files / "test.jsonl")}  # fmt: skip
    keep = [o for o in QUICKSTART_SHORT if not o.startswith("data.")]
    return [*keep, f"data={json.dumps(data)}"]


def exact_scenes(run_dir: Path) -> float:
    """Share of held-out captions that state their image's scene exactly, by the shapes oracle. Scored from
    samples.jsonl, so it works for any data source (a JSONL set has no oracle of its own)."""
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 200
    return sum(parse_caption(s["caption"]) == parse_caption(s["references"][0]) for s in samples) / len(samples)


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history]


def assert_learned(result, accuracy: float) -> None:
    curve = losses(result)
    assert result.steps == 300 and len(curve) == 300
    assert curve[-1] <= curve[0] / 2, f"training loss went from {curve[0]:.3f} to {curve[-1]:.3f}"
    assert result.metrics["test_loss"] <= curve[0] / 2
    found = exact_scenes(result.run_dir)
    assert found >= accuracy, f"{found:.1%} of held-out scenes stated exactly, expected at least {accuracy:.0%}"


def assert_learned_no_scene(control, real) -> None:
    found = exact_scenes(control.run_dir)
    assert found <= CONTROL_ACCURACY, f"trained on shuffled pairs, it still states {found:.1%} of scenes"
    assert control.metrics["test_loss"] >= CONTROL_LOSS_RATIO * real.metrics["test_loss"]


@pytest.fixture(scope="module")
def crossattn(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossattn")
    return train_quietly("quickstart-crossattn", QUICKSTART_SHORT, root / "run", root / "cache")


def test_quickstart_learns_to_state_held_out_scenes(quickstart_short):
    assert_learned(quickstart_short, QUICKSTART_ACCURACY)
    # the run's own metric is the same oracle
    assert quickstart_short.metrics["test_oracle_accuracy"] == exact_scenes(quickstart_short.run_dir)


def test_a_recipe_reading_jsonl_files_trains_on_the_same_pairs(quickstart_short, files, tmp_path):
    result = train_quietly("quickstart", jsonl(files, "train.jsonl"), tmp_path / "run", tmp_path / "cache")
    assert_learned(result, QUICKSTART_ACCURACY)
    # Same images and captions in the same order as the shapes source, losslessly through PNG: the same run.
    assert losses(result) == pytest.approx(losses(quickstart_short), rel=1e-5)
    assert exact_scenes(result.run_dir) == exact_scenes(quickstart_short.run_dir)


def test_quickstart_on_shuffled_pairs_learns_no_scene(quickstart_short, files, tmp_path):
    control = train_quietly("quickstart", jsonl(files, "shuffled.jsonl"), tmp_path / "run", tmp_path / "cache")
    assert losses(control)[-1] <= losses(control)[0] / 2  # it does learn: the captions' words and grammar
    assert_learned_no_scene(control, quickstart_short)


def test_the_crossattn_baseline_learns_to_state_held_out_scenes(crossattn):
    assert_learned(crossattn, CROSSATTN_ACCURACY)
    assert crossattn.metrics["test_oracle_accuracy"] == exact_scenes(crossattn.run_dir)


def test_the_crossattn_baseline_on_shuffled_pairs_learns_no_scene(crossattn, files, tmp_path):
    overrides = jsonl(files, "shuffled.jsonl")
    control = train_quietly("quickstart-crossattn", overrides, tmp_path / "run", tmp_path / "cache")
    assert_learned_no_scene(control, crossattn)
