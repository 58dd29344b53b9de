"""The shapes world: generated images of 1-3 coloured shapes, their exact captions, and a parser that scores captions.

prefixcap must train and be tested with no network, so its default dataset is made here: a scene is a left-to-right
row of shapes (colour x kind, optionally x size), drawn in distinct horizontal slots so that "left of" is never in
doubt. The vocabulary is deliberately tiny and regular (20 words, 22 with sizes) so that a small model learns it in
minutes on a CPU, and because every caption the generator writes follows one grammar, ``parse_caption`` can read a
model's caption back into a scene and ``scene_accuracy`` can say exactly whether it was right, which n-gram metrics
cannot.

Splits: example ``i`` of split ``s`` comes from its own generator, seeded with the string
``"prefixcap-shapes/{seed}/{s}/{i}"``, so no two examples share a seed, in any split or under any other seed
(integer offsets such as seed+1 for val would make one run's val another run's train). An example therefore does
not depend on the split sizes (a larger train_size only appends) and can be made on its own (``example(split, i)``).
Seeds alone still let a 64-pixel world draw the same picture twice (a one-shape scene has ~10^5 layouts; at the
defaults one test image was a train image), so each stream also owns a fifth of the layouts: the leftmost shape's
top row ``y0`` is the stream's number modulo 5 (train 0, val 1, test 2, and two streams no recipe can name: pretrain 3
and pretrain-heldout 4, where the shipped encoder and CLIP learnt the world, scripts/pretrain_shapes.py). Images of
different streams always differ, whatever the seeds: no run's split holds a picture the shipped models trained on.
Splits do share compositions: with 12 shapes there are only 1,884 scenes (14,424 with sizes), so most val and test
*scenes* also occur in train, drawn elsewhere and at other sizes. The test split measures recognition, not
compositional generalisation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes_languages import LANGUAGES as LANGUAGES, grammar  # LANGUAGES: this module's too
from prefixcap.interfaces import DatasetSource, Example, Metric, Rows

# Saturated, far apart in RGB and from the grey background, so colour is never the hard part at 64 pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 200, 30),
}  # fmt: skip
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
SPLITS = ("train", "val", "test")  # a recipe's
STREAMS = (*SPLITS, "pretrain", "pretrain-heldout")  # each owns the layouts with leftmost y0 % 5 == its number
BACKGROUND = 235  # light grey

# Side of a shape's bounding box, as fractions of the image side. "small" and "large" leave a gap between them so
# that the size word is a fact about the picture, not a guess near a threshold; without sizes the side still varies.
SIDE: dict[str | None, tuple[float, float]] = {None: (0.17, 0.25), "small": (0.11, 0.15), "large": (0.22, 0.27)}


class Shape(NamedTuple):
    colour: str
    kind: str
    size: str | None = None  # None when the world is drawn without sizes

    def phrase(self) -> str:
        return " ".join(word for word in (self.size, self.colour, self.kind) if word)


Scene = tuple[Shape, ...]  # left to right
Box = tuple[int, int, int, int]  # x0, y0, x1, y1, all inclusive (PIL's convention for ellipse and rectangle)


@dataclass
class ShapesExample(Example):
    scene: Scene
    boxes: tuple[Box, ...]  # one per shape, in the same order as ``scene``


def references(scene: Scene, language: str = "en") -> list[str]:
    """Every caption the generator writes for ``scene`` in ``language`` (one of LANGUAGES; the others are written by
    prefixcap.data.shapes_languages); all exact, worded differently. The first is the plainest."""
    if (other := grammar(language)) is not None:
        return other.references(scene)
    a = [f"a {shape.phrase()}" for shape in scene]
    if len(scene) == 1:
        one = scene[0].phrase()
        return [f"a {one}", f"one {one}", f"a single {one}"]
    if len(scene) == 2:
        return [
            f"{a[0]} left of {a[1]}",
            f"{a[1]} to the right of {a[0]}",
            f"{a[0]} on the left and {a[1]} on the right",
            f"{a[0]} and {a[1]} from left to right",
            f"from left to right: {a[0]} and {a[1]}",
        ]
    if len(scene) == 3:
        listed = f"{a[0]}, {a[1]} and {a[2]}"
        return [
            f"{listed} from left to right",
            f"from left to right: {listed}",
            f"{a[0]} on the left, {a[1]} in the middle and {a[2]} on the right",
        ]
    raise ValueError(f"a scene has 1 to 3 shapes, not {len(scene)}")


# The oracle. A caption is normalised (lower case, anything but letters becomes a space), each noun phrase is
# replaced by "#", and what is left, the skeleton, must be one of the forms below word for word: any other word,
# a missing or extra shape, or a shape without its article leaves a skeleton that is not listed, hence None.
_NOUN_PHRASE = re.compile(
    rf"\b(?:a single|an?|one) (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(KINDS)})\b"
)
_FORMS: dict[str, tuple[int, ...]] = {  # skeleton -> which phrase is 1st, 2nd, ... from the left
    "#": (0,),
    "# left of #": (0, 1),
    "# to the left of #": (0, 1),
    "# right of #": (1, 0),
    "# to the right of #": (1, 0),
    "# on the left and # on the right": (0, 1),
    "# on the left # in the middle and # on the right": (0, 1, 2),
    **{form.format(listed): order
       for listed, order in (("# and #", (0, 1)), ("# # and #", (0, 1, 2)))
       for form in ("{} from left to right", "from left to right {}")},
}  # fmt: skip


def parse_caption(text: str, language: str = "en") -> Scene | None:
    """The scene a caption states, left to right, or None if it is not a caption of the language's shapes grammar."""
    parsed = _phrases(text, language)
    return None if parsed is None else tuple(parsed[0][i] for i in parsed[1])


def _phrases(text: str, language: str = "en") -> tuple[list[Shape], tuple[int, ...]] | None:
    """The caption's noun phrases in the order it names them, and which of them is 1st, 2nd, ... from the left."""
    if (other := grammar(language)) is not None:
        return None if (found := other.phrases(text)) is None else ([Shape(*s) for s in found[0]], found[1])
    shapes: list[Shape] = []

    def take(match: re.Match[str]) -> str:
        shapes.append(Shape(colour=match[2], kind=match[3], size=match[1]))
        return "#"

    skeleton = _NOUN_PHRASE.sub(take, " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split()))
    order = _FORMS.get(skeleton)
    return None if order is None else (shapes, order)


def shape_words(words: Sequence[str], scene: Scene, language: str = "en") -> list[tuple[int, int]]:
    """(word index, position in ``scene``) of each shape noun ("circle", ...) of a caption given as its words, when
    the caption states ``scene`` exactly; [] otherwise. Each noun phrase holds one such noun, in the caption's
    order, so the k-th noun is the k-th phrase, and the grammar says which shape that phrase is."""
    parsed = _phrases(" ".join(words), language)
    if parsed is None or tuple(parsed[0][i] for i in parsed[1]) != tuple(scene):
        return []
    other = grammar(language)
    is_noun = other.is_noun if other else (lambda word: re.sub(r"[^a-z]+", "", word.lower()) in KINDS)
    nouns = [i for i, word in enumerate(words) if is_noun(word)]
    return [(word, parsed[1].index(k)) for k, word in enumerate(nouns)] if len(nouns) == len(scene) else []


def scene_accuracy(captions: Sequence[str], scenes: Sequence[Scene], language: str = "en") -> float:
    """Fraction of captions that state their scene exactly (an unparsable caption counts as wrong)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    if not captions:
        raise ValueError("no captions to score")
    return sum(parse_caption(c, language) == tuple(s) for c, s in zip(captions, scenes)) / len(captions)


def minimal_edits(scene: Scene) -> list[Scene]:
    """Every scene one edit away from ``scene``: one shape's colour changed, one shape's kind changed, or two shapes
    swapped (with two or more), each a different scene, without repeats, in a fixed order (deterministic)."""
    edits: list[Scene] = []
    for i, shape in enumerate(scene):
        edits += [scene[:i] + (shape._replace(colour=c),) + scene[i + 1 :] for c in COLOURS if c != shape.colour]
    for i, shape in enumerate(scene):
        edits += [scene[:i] + (shape._replace(kind=k),) + scene[i + 1 :] for k in KINDS if k != shape.kind]
    for i in range(len(scene)):
        for j in range(i + 1, len(scene)):
            swapped = list(scene)
            swapped[i], swapped[j] = scene[j], scene[i]
            edits.append(tuple(swapped))
    # A swap of two equal shapes is the scene itself; dict keys drop it and any repeat, keeping the order.
    return [edit for edit in dict.fromkeys(edits) if edit != tuple(scene)]


def hard_negatives(scene: Scene, language: str = "en") -> list[str]:
    """The plainest caption (``references(...)[0]``) of each of ``minimal_edits(scene)``: the true caption's own
    words with one colour, one kind or the order changed. Each is kept only if the oracle reads it back as another
    scene, so a caption that still states ``scene`` (or states nothing) is never counted against the truth."""
    captions = [references(edit, language)[0] for edit in minimal_edits(scene)]
    kept = [c for c in captions if (stated := parse_caption(c, language)) is not None and stated != tuple(scene)]
    return list(dict.fromkeys(kept))


class ShapesSource(DatasetSource):
    """The registered ``shapes`` dataset: deterministic by (seed, split, index); see the module docstring."""

    clip_model = "prefixcap/shapes-clip"  # a real CLIP, trained on this world, since none can be fetched offline
    # Exact, where n-gram metrics are not: a caption either states the drawn scene or it does not. 0.9 is the
    # quality `prefixcap bench` times by default (the quickstart reaches 1.0).
    headline = Metric("oracle_accuracy", "exact-scene accuracy", higher_is_better=True, target=0.9, bounds=(0, 1))

    def __init__(self, options: ShapesOptions | None = None):
        self.options = options or ShapesOptions()

    def size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; the shapes world has {', '.join(SPLITS)}")
        return getattr(self.options, f"{split}_size")

    def examples(self, split: str) -> Iterator[ShapesExample]:
        for index in range(self.size(split)):
            yield self.example(split, index)

    def rows(self, split: str) -> ShapesRows:
        return ShapesRows(self, split)

    def scenes(self, split: str) -> Iterator[Scene]:
        """The scenes of ``examples(split)``, in order, without drawing any image (for scoring a model's captions)."""
        for index in range(self.size(split)):
            yield self._layout(split, self._rng(split, index))[0]

    def example(self, split: str, index: int) -> ShapesExample:
        if not 0 <= index < self.size(split):
            raise IndexError(f"{split} has {self.size(split)} examples; there is no example {index}")
        return self.draw(split, index)

    def draw(self, stream: str, index: int) -> ShapesExample:
        """Example ``index`` of any of STREAMS, with no split size to bound it (the pretraining script's access)."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; the shapes world has {', '.join(STREAMS)}")
        rng = self._rng(stream, index)
        scene, boxes = self._layout(stream, rng)
        image = self._draw(scene, boxes, rng)
        return ShapesExample(image=image, captions=references(scene, self.options.language), scene=scene, boxes=boxes)

    def task_metrics(self, split: str, indices: Sequence[int], captions: Sequence[str]) -> dict[str, float]:
        """Exact-scene accuracy: the share of captions the oracle parses back into exactly the drawn scene."""
        if not captions:
            return {}
        scenes = list(self.scenes(split))
        return {"oracle_accuracy": scene_accuracy(captions, [scenes[i] for i in indices], self.options.language)}

    def word_boxes(self, split: str, index: int, words: Sequence[str]) -> list[tuple[int, tuple[int, int, int, int]]]:
        """Each shape noun of a correct caption with its shape's box, as pixel edges (see ``shape_words``)."""
        if not 0 <= index < self.size(split):
            raise IndexError(f"{split} has {self.size(split)} examples; there is no example {index}")
        scene, boxes = self._layout(split, self._rng(split, index))
        placed = shape_words(words, scene, self.options.language)
        return [(word, (x0, y0, x1 + 1, y1 + 1))  # inclusive pixels -> edges
                for word, (x0, y0, x1, y1) in ((w, boxes[pos]) for w, pos in placed)]  # fmt: skip

    def glossary(self) -> dict[str, str]:
        other = grammar(self.options.language)
        return {} if other is None else other.glossary()

    def hard_negatives(self, split: str, index: int) -> list[str]:
        """Minimal edits of example ``index``'s first reference, each checked to state another scene (see
        ``hard_negatives``): what `prefixcap bench`'s hard-negative test puts against the true caption."""
        if not 0 <= index < self.size(split):
            raise IndexError(f"{split} has {self.size(split)} examples; there is no example {index}")
        return hard_negatives(self._layout(split, self._rng(split, index))[0], self.options.language)

    def _rng(self, split: str, index: int) -> random.Random:
        # A str seed is hashed with SHA-512 by random.Random: stable across processes, platforms and PYTHONHASHSEED.
        return random.Random(f"prefixcap-shapes/{self.options.seed}/{split}/{index}")

    def _layout(self, stream: str, rng: random.Random) -> tuple[Scene, tuple[Box, ...]]:
        """Draw the scene, then one box per shape inside its own slot of the image's width."""
        opts = self.options
        n = rng.randint(1, opts.max_shapes)
        scene = tuple(
            Shape(rng.choice(tuple(COLOURS)), rng.choice(KINDS), rng.choice(SIZES) if opts.sizes else None)
            for _ in range(n)
        )
        side, gap = opts.image_size, max(1, opts.image_size // 32)
        boxes = []
        for i, shape in enumerate(scene):
            # n equal slots with a gap at each edge: every pixel of shape i lies left of every pixel of shape i+1.
            left, right = i * side // n + gap, (i + 1) * side // n - gap  # usable columns [left, right)
            lo, hi = SIDE[shape.size]
            d = min(rng.randint(round(lo * side), round(hi * side)), right - left)
            x0, rows = rng.randint(left, right - d), range(gap, side - gap - d + 1)
            # The stream's mark on the leftmost shape (see the module docstring); rows has >= 20 values at any size.
            y0 = rng.choice([y for y in rows if y % len(STREAMS) == STREAMS.index(stream)] if i == 0 else rows)
            boxes.append((x0, y0, x0 + d - 1, y0 + d - 1))
        return scene, tuple(boxes)

    def _draw(self, scene: Scene, boxes: tuple[Box, ...], rng: random.Random) -> Image.Image:
        side, noise = self.options.image_size, self.options.noise
        if noise > 0:
            # Grey grain, the same in all three channels, so the background never takes on a shape's colour.
            grain = np.random.default_rng(rng.getrandbits(64)).normal(BACKGROUND, 64 * noise, (side, side, 1))
            image = Image.fromarray(np.repeat(grain.clip(0, 255).astype(np.uint8), 3, axis=2))
        else:
            image = Image.new("RGB", (side, side), (BACKGROUND,) * 3)
        draw = ImageDraw.Draw(image)
        for shape, (x0, y0, x1, y1) in zip(scene, boxes):
            fill = COLOURS[shape.colour]
            if shape.kind == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape.kind == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:  # triangle, pointing up
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        return image


class ShapesRows(Rows):
    """A split drawn on demand: example ``i`` is a pure function of (options, split, i), so nothing is stored."""

    def __init__(self, source: ShapesSource, split: str):
        self.source, self.split, self.n = source, split, source.size(split)

    def __len__(self) -> int:
        return self.n

    def captions(self, index: int) -> list[str]:
        scene = self.source._layout(self.split, self.source._rng(self.split, index))[0]
        return references(scene, self.source.options.language)

    def image(self, index: int) -> Image.Image:
        return self.source.example(self.split, index).image

    def identity(self) -> str:
        # The generator's own version: drawing code that changes pictures must change it, or caches go stale.
        # Other splits' sizes are left out: a longer val split leaves the train pictures as they were; so is the
        # language, which changes captions only: every language shares the same pictures' features.
        others = {f"{s}_size" for s in SPLITS if s != self.split} | {"language"}
        return f"shapes-2:{self.split}:{self.source.options.model_dump_json(exclude=others)}"
