"""The pointing game: do a system's maps (prefixcap.explain) point at what its words name?

For each held-out image whose greedy caption states it correctly, each word the data set can place
(DatasetSource.word_boxes: the shapes world's shape nouns) is a hit when its map's peak (Explanation.peak) falls
inside that word's box. The game of Zhang et al. (2016, "Top-down neural attention by excitation backprop"), here
with no tolerance margin: the boxes are exact. Two baselines on the same words: chance (a point anywhere: the box's
share of the image, averaged) and centre (pointing at the image's centre every time).

Memory: one batch of images and their maps at a time; only counts are kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prefixcap.explain import DEFAULT_LAYERS, METHODS, ExplainError, Explanation, explain

if TYPE_CHECKING:
    from prefixcap.interfaces import DatasetSource, System

POINTING_IMAGES = 200  # held-out images played on by default: 4 explanations each (2 methods, with and without rollout)
BATCH = 16


def inside(point: tuple[float, float], box: Sequence[float]) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def pointing_game(system: System, source: DatasetSource, split: str = "test", *, images: int = POINTING_IMAGES,
                  methods: Sequence[str] = METHODS) -> dict[str, Any]:  # fmt: skip
    """Pointing accuracy of each method on the first ``images`` of ``split``, with the baselines, as bench.json holds
    it: through the encoder (explain's default) and without (``rollout=False``), and for the attention method each
    layer's own accuracy (heads averaged). Raises NotImplementedError when the data set cannot place words."""
    rows = source.rows(split)
    if rows is None:
        raise ValueError(f"the data set has no {split} split")
    n = min(len(rows), images)
    if n:
        source.word_boxes(split, 0, [])  # a source without boxes says so before anything runs
    variants = [(method, rollout) for method in methods for rollout in (True, False)]
    hits = dict.fromkeys(variants, 0)
    layer_hits: list[int] = []
    words = captions = centre = 0
    chance = 0.0
    why: dict[str, str] = {}
    for start in range(0, n, BATCH):
        indices = list(range(start, min(n, start + BATCH)))
        batch = [rows.image(i) for i in indices]
        said: list[str] | None = None
        placed: list[list[tuple[int, Sequence[float]]]] = []
        for method, rollout in variants:
            if method in why:
                continue
            try:
                found = explain(system, batch, method, captions=said, rollout=rollout)
            except ExplainError as e:  # a plugin system without attention maps: the other method still plays
                why[method] = str(e)
                continue
            if said is None:  # the first method's greedy captions are every method's, so they play on the same words
                said = [e.caption for e in found]
                placed = [source.word_boxes(split, i, [w.text for w in e.words]) for i, e in zip(indices, found)]
                for e, pairs in zip(found, placed):
                    width, height = e.image_size
                    captions += bool(pairs)
                    words += len(pairs)
                    centre += sum(inside((width / 2, height / 2), box) for _, box in pairs)
                    chance += sum((box[2] - box[0]) * (box[3] - box[1]) / (width * height) for _, box in pairs)
            hits[method, rollout] += sum(_hits(e, pairs) for e, pairs in zip(found, placed))
            if method == "attention" and rollout:
                layers = found[0].maps.shape[1] if found else 0
                layer_hits = layer_hits or [0] * layers
                for layer in range(layers):
                    layer_hits[layer] += sum(_hits(e, pairs, layer) for e, pairs in zip(found, placed))
    share = (lambda count: count / words if words else None)  # noqa: E731
    if n and not words:  # a barely trained system: a figure of 0 words would be no figure, so say why there is none
        why = {m: why.get(m, f"none of the {n} captions stated its image correctly: no word to point with")
               for m in methods}  # fmt: skip
    return {
        "split": split, "images": n, "correct_captions": captions, "words": words,
        "accuracy": {m: share(hits[m, True]) for m in methods if m not in why},
        "accuracy_without_rollout": {m: share(hits[m, False]) for m in methods if m not in why},
        "attention_by_layer": [share(h) for h in layer_hits],
        "chance": share(chance), "centre": share(centre), "why": why,
    }  # fmt: skip


def _hits(found: Explanation, pairs: list[tuple[int, Sequence[float]]], layer: int | None = DEFAULT_LAYERS) -> int:
    return sum(inside(found.peak(word, layer=layer), box) for word, box in pairs)


def measure_pointing(system: System, source: DatasetSource, images: int = POINTING_IMAGES) -> dict[str, Any]:
    """`prefixcap bench`'s pointing figures for one trained entry: ``pointing_game`` on the test split (else val), or
    ``{"why": ...}`` when the data set cannot place words or has neither split."""
    split = next((s for s in ("test", "val") if (rows := source.rows(s)) is not None and len(rows)), None)
    if split is None:
        return {"why": "the data set has no held-out images"}
    tic = time.perf_counter()
    try:
        found = pointing_game(system, source, split, images=images)
    except NotImplementedError as e:
        return {"why": str(e)}
    return {**found, "seconds": time.perf_counter() - tic}
