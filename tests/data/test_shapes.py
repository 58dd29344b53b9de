"""The shapes world: deterministic generation, pictures that match their scenes, and an oracle that is exact both
ways (every reference parses back to its scene; a caption that is wrong about the scene never does)."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import numpy as np
import pytest

import prefixcap
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import (
    BACKGROUND, COLOURS, KINDS, SIZES, SPLITS, STREAMS, Scene, Shape, ShapesExample, ShapesSource, parse_caption, references,
    scene_accuracy,
)  # fmt: skip
from prefixcap.errors import PluginError
from prefixcap.interfaces import Example

# Every word the generator writes.
VOCABULARY = sorted({w for n in (1, 2, 3) for c in references((Shape("red", "circle", "small"),) * n)
                     for w in re.findall("[a-z]+", c)} | set(COLOURS) | set(KINDS) | set(SIZES))  # fmt: skip


# Which RGB channels are bright in each colour: what the words mean, independently of the generator's constants.
LOOKS = {"red": (True, False, False), "green": (False, True, False), "blue": (False, False, True),
         "yellow": (True, True, False)}  # fmt: skip

# How much of its box each kind covers (pi/4 for a circle, 1/2 for a triangle), with room for rasterising small ones.
FILL = {"square": (1.0, 1.0), "circle": (0.7, 0.9), "triangle": (0.45, 0.68)}


def source(**options) -> ShapesSource:
    return ShapesSource(ShapesOptions(**options))


def take(src: ShapesSource, split: str, n: int) -> list[ShapesExample]:
    return [src.example(split, i) for i in range(n)]


def test_same_seed_same_examples_other_seed_others():
    a, b = take(source(noise=0.3), "train", 60), take(source(noise=0.3), "train", 60)
    assert [e.image.tobytes() for e in a] == [e.image.tobytes() for e in b]
    assert [e.captions for e in a] == [e.captions for e in b]
    other = take(source(noise=0.3, seed=1), "train", 60)
    assert sum(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other)) == 60
    assert [e.captions for e in a] != [e.captions for e in other]


def test_examples_scenes_and_random_access_agree():
    src = source(train_size=50, val_size=7, test_size=0)
    for split, size in (("train", 50), ("val", 7), ("test", 0)):
        listed = list(src.examples(split))
        assert len(listed) == size and all(isinstance(e, Example) for e in listed)
        assert list(src.scenes(split)) == [e.scene for e in listed]
        assert [e.captions for e in listed] == [e.captions for e in take(src, split, size)]
    assert src.example("train", 3).image.tobytes() == source(train_size=4000).example("train", 3).image.tobytes()
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        list(src.examples("dev"))
    with pytest.raises(IndexError):
        src.example("val", 7)


@pytest.mark.parametrize("options", [{}, {"sizes": True, "noise": 0.5}], ids=["plain", "sizes"])
def test_every_reference_parses_back_to_its_scene(options):
    examples = list(source(train_size=1000, **options).examples("train"))
    assert {len(e.scene) for e in examples} == {1, 2, 3}
    for e in examples:
        assert len(e.captions) >= 3 and len(set(e.captions)) == len(e.captions)
        assert all(parse_caption(c) == e.scene for c in e.captions), e.captions
        assert all(shape.size in (SIZES if options else (None,)) for shape in e.scene)
    scenes = [e.scene for e in examples]
    for k in range(3):  # every wording on its own scores 100%
        assert scene_accuracy([e.captions[k] for e in examples], scenes) == 1.0


def test_parser_tolerates_case_punctuation_and_spacing():
    red, blue, green = Shape("red", "circle"), Shape("blue", "square"), Shape("green", "triangle")
    assert parse_caption("A Red Circle.") == (red,)
    assert parse_caption("  a single red circle!  ") == (red,)
    assert parse_caption("A blue square, to the right of a red circle.") == (red, blue)
    assert parse_caption("a blue square right of a red circle") == (red, blue)
    assert parse_caption("FROM LEFT TO RIGHT:a red circle,a blue square and a green triangle") == (red, blue, green)
    assert parse_caption("a large red circle left of a small blue square") == (red._replace(size="large"),
                                                                             blue._replace(size="small"))  # fmt: skip


def _perturbations(caption: str, scene: Scene, rng: random.Random) -> dict[str, list[str]]:
    """Captions that are wrong about ``scene`` (or not captions at all), made by editing a reference."""
    words = caption.split()
    wrong_colour = [" ".join(words[:i] + [re.sub("[a-z]+", other, w, count=1)] + words[i + 1:])
                    for i, w in enumerate(words) if w.strip(",:") in COLOURS
                    for other in COLOURS if other != w.strip(",:")]  # fmt: skip
    wrong_order = []
    if len(set(scene)) > 1:
        a, b = scene[0].phrase(), next(s for s in scene if s != scene[0]).phrase()
        wrong_order.append(caption.replace(a, "\0").replace(b, a).replace("\0", b))  # every A becomes B and back
        wrong_order.append(caption.replace("left", "\0").replace("right", "left").replace("\0", "right"))
    missing = [" ".join(re.sub(rf"\b(a single|a|one) {s.phrase()}\b", "", caption, count=1).split()).strip(" ,")
               for s in set(scene)]  # fmt: skip
    # One extra word anywhere ("single" is left out: "a single red circle" is itself a reference), or a tail.
    extra = [w for w in VOCABULARY if w != "single"]
    soup = [" ".join(words[:i] + [w] + words[i:]) for i in range(len(words) + 1)
            for w in rng.sample(extra, 4) + ["banana"]]  # fmt: skip
    soup += [f"{caption} {' '.join(rng.choices(VOCABULARY, k=3))}", f"{caption} {caption}", f"{caption} banana"]
    return {"wrong colour": wrong_colour, "wrong order": wrong_order, "missing shape": missing, "soup": soup}


@pytest.mark.parametrize("sizes", [False, True])
def test_perturbed_captions_do_not_match(sizes):
    rng = random.Random(0)
    src = source(sizes=sizes, train_size=150)
    counts = dict.fromkeys(["wrong colour", "wrong order", "missing shape", "soup"], 0)
    for scene in src.scenes("train"):
        for caption in references(scene):
            for kind, variants in _perturbations(caption, scene, rng).items():
                for variant in variants:
                    assert parse_caption(variant) != scene, (kind, caption, variant)
                    counts[kind] += 1
                    if "banana" in variant or variant == f"{caption} {caption}":
                        assert parse_caption(variant) is None, variant
    assert min(counts.values()) > 100, counts
    scenes = list(src.scenes("train"))
    assert scene_accuracy([references(s)[0] for s in scenes[:-1]] + ["a purple circle"], scenes) == 149 / 150
    with pytest.raises(ValueError):
        scene_accuracy(["a red circle"], scenes)


@pytest.mark.parametrize("options", [{}, {"sizes": True, "noise": 0.6, "image_size": 32}], ids=["plain", "noisy"])
def test_each_shape_is_drawn_in_its_slot_in_its_colour(options):
    src = source(**options)
    side = src.options.image_size
    for e in take(src, "val", 200):
        pixels = np.asarray(e.image)
        assert e.image.mode == "RGB" and pixels.shape == (side, side, 3)
        covered = np.zeros((side, side), bool)
        n = len(e.scene)
        for i, (shape, (x0, y0, x1, y1)) in enumerate(zip(e.scene, e.boxes)):
            assert i * side // n <= x0 <= x1 < (i + 1) * side // n and 0 <= y0 <= y1 < side  # inside slot i
            colour = COLOURS[shape.colour]
            assert tuple(c > 128 for c in colour) == LOOKS[shape.colour]
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == colour
            fill = (pixels[y0:y1 + 1, x0:x1 + 1] == colour).all(axis=2).mean()
            assert FILL[shape.kind][0] <= fill <= FILL[shape.kind][1], (shape, fill)
            covered[y0:y1 + 1, x0:x1 + 1] = True
        assert [x1 < x0 for (_, _, x1, _), (x0, _, _, _) in zip(e.boxes, e.boxes[1:])] == [True] * (n - 1)
        outside = pixels[~covered]
        if options:  # grain is grey: no shape colour can appear on the background
            assert (outside[:, 0] == outside[:, 1]).all() and (outside[:, 1] == outside[:, 2]).all()
        else:
            assert (outside == BACKGROUND).all()


def test_splits_never_share_an_image():
    src = source()
    images = {split: {e.image.tobytes() for e in src.examples(split)} for split in SPLITS}
    assert len(images["val"]) == len(images["test"]) == 200
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    scenes = {split: list(src.scenes(split)) for split in SPLITS}  # independent streams, not one stream thrice
    assert sum(a == b for a, b in zip(scenes["train"], scenes["val"])) < 20
    assert sum(a == b for a, b in zip(scenes["val"], scenes["test"])) < 20
    for number, split in enumerate(SPLITS):  # the split's mark on the leftmost shape
        assert all(e.boxes[0][1] % len(STREAMS) == number for e in take(src, split, 100))


def test_the_pretraining_streams_share_no_picture_with_any_runs_splits():
    # The shipped encoder and CLIP learnt the world from these streams; under any seed a run's split may draw the
    # same scene, never the same picture, so no recipe's test image was seen in pretraining.
    pretrain = {s: [source().draw(s, i) for i in range(300)] for s in STREAMS[len(SPLITS):]}
    assert {e.boxes[0][1] % len(STREAMS) for e in pretrain["pretrain"]} == {3}
    assert {e.boxes[0][1] % len(STREAMS) for e in pretrain["pretrain-heldout"]} == {4}
    for seed in (0, 1):
        runs = source(seed=seed, train_size=300, val_size=300, test_size=300)
        for split in SPLITS:
            for e in runs.examples(split):
                assert e.boxes[0][1] % len(STREAMS) == SPLITS.index(split)
    with pytest.raises(ValueError, match="unknown stream"):
        source().draw("dev", 0)
    with pytest.raises(ValueError, match="unknown split"):
        source().example("pretrain", 0)  # a recipe cannot name them


def test_options_shape_the_world():
    one = take(source(max_shapes=1), "train", 100)
    assert {len(e.scene) for e in one} == {1}
    small = take(source(image_size=32, sizes=True), "test", 100)
    assert {e.image.size for e in small} == {(32, 32)}
    assert {s.size for e in small for s in e.scene} == set(SIZES)
    sides = {size: [x1 - x0 for e in small for s, (x0, _, x1, _) in zip(e.scene, e.boxes) if s.size == size]
             for size in SIZES}  # fmt: skip
    assert max(sides["small"]) < min(sides["large"])


def test_registered_and_built_through_the_registry():
    (reg,) = prefixcap.list_components("dataset", "^shapes$")
    assert reg.options is ShapesOptions and reg.description
    src = prefixcap.create("dataset", "shapes", {"train_size": 5, "image_size": 48, "sizes": True})
    assert isinstance(src, ShapesSource)
    examples = list(src.examples("train"))
    assert len(examples) == 5 and examples[0].image.size == (48, 48)
    for bad in ({"max_shapes": 4}, {"max_shapes": 0}, {"noise": 1.5}, {"image_size": 8}, {"train_size": 0},
                {"seed": -1}, {"colours": 5}):  # fmt: skip
        with pytest.raises(PluginError, match="invalid options"):
            prefixcap.create("dataset", "shapes", bad)


def test_plugin_module_does_not_import_torch():
    code = "import sys, prefixcap.data; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_task_metrics_score_captions_of_the_kept_examples():
    source = ShapesSource(ShapesOptions(val_size=6))
    examples = list(source.examples("val"))
    kept = [0, 2, 5]  # as if examples 1, 3 and 4 had been skipped
    captions = [examples[i].captions[-1] for i in kept]
    assert source.task_metrics("val", kept, captions) == {"oracle_accuracy": 1.0}
    captions[1] = examples[1].captions[0] if examples[1].scene != examples[2].scene else "a red circle left of"
    assert source.task_metrics("val", kept, captions)["oracle_accuracy"] == pytest.approx(2 / 3)
