"""What the learning tests (tests/test_learning.py, tests/systems/test_crossattn_learning.py) share: the protocol,
the shapes data written as files, and the checks. The protocol is explained in tests/test_learning.py."""

from __future__ import annotations

import json
from pathlib import Path

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource, parse_caption

from conftest import QUICKSTART_SHORT

# Exact scenes, held out, after 300 steps. 0.85 until the shapes encoder was retrained on the world's own pretrain
# stream (the first one had seen 386 pictures of seed 0's training split): measured 91.5% then, 83.5% after, 81%
# since the recipes train itc (with blank images), 74.5% since the tiny tokenizer has German, French and Russian
# words too (615 tokens, not 345: another random init, and 270 more tokens to learn to rule out), and still 100% after
# the quickstart's 2,000 steps.
QUICKSTART_ACCURACY = 0.70
CROSSATTN_ACCURACY = 0.65  # the baseline learns more slowly on this world (72.5% here; README: 96% after 2,000 steps)
CONTROL_ACCURACY = 0.05  # chance of stating a scene exactly without looking is far below this
CONTROL_LOSS_RATIO = 3.0  # the control's held-out loss is at least this many times the real run's


def write_shapes_files(root: Path) -> Path:
    """The quickstart's shapes data (same seed and sizes) as PNG files with JSONL indexes in ``root``: train.jsonl,
    shuffled.jsonl (each training image given the captions of the image half the set away), val.jsonl, test.jsonl."""
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
    print(f"{result.run_dir}: {found:.1%} of held-out scenes stated exactly")  # the figure the docs quote (-rP)
    assert found >= accuracy, f"{found:.1%} of held-out scenes stated exactly, expected at least {accuracy:.0%}"


def assert_learned_no_scene(control, real) -> None:
    found = exact_scenes(control.run_dir)
    ratio = control.metrics["test_loss"] / real.metrics["test_loss"]
    print(f"{control.run_dir}: {found:.1%} of held-out scenes stated exactly; held-out loss {ratio:.1f}x the real run's")
    assert found <= CONTROL_ACCURACY, f"trained on shuffled pairs, it still states {found:.1%} of scenes"
    assert control.metrics["test_loss"] >= CONTROL_LOSS_RATIO * real.metrics["test_loss"]


def judging(run_dir: Path, images: int = 100) -> dict[str, dict[str, float]]:
    """How well a run's saved system judges captions on the first ``images`` held-out shapes, as `prefixcap bench`
    measures it (prefixcap.matching): per score type, retrieval recall and hard-negative accuracy; and the share of
    the images' true captions at or above the run's calibrated --min-score (measured on the validation split)."""
    import prefixcap
    from prefixcap.matching import measure_matching
    from prefixcap.score import score_candidates

    system = prefixcap.load(run_dir / "final")
    source = ShapesSource(ShapesOptions(test_size=200))
    found = measure_matching(system, source, images)["scores"]
    examples = [source.example("test", i) for i in range(images)]
    own = score_candidates(system, [e.image for e in examples], [[e.captions[0]] for e in examples])
    for kind, figures in found.items():
        if figures is not None:
            calibration = system.score_calibration[kind]
            figures["true_above_min"] = sum(float(s[kind][0]) >= calibration["min_score"] for s in own) / images
            figures["calibrated_on"] = calibration["pairs"]
    print(f"{run_dir}: {found}")  # the figures the docs quote (-rP)
    return {kind: figures for kind, figures in found.items() if figures is not None}
