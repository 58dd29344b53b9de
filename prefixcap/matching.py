"""Image-text matching of a trained system on held-out images, for `prefixcap bench`: image->text and text->image
recall@1/@5 (prefixcap.retrieval) against the distinct true captions, and the hard-negative test, in which each
image's true caption competes with the data set's minimal edits of it (DatasetSource.hard_negatives), for each score
type (prefixcap.score) and for the data's CLIPScore model as the reference.

Memory: the (images, captions) score matrices of a bounded set (bench's matching_images, 100 by default) and its
pixels; nothing grows with the split.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefixcap.errors import PrefixcapError

class MatchingError(PrefixcapError):
    """A data set's hard negatives are not what the interface promises."""


MATCH_BATCH = 32  # images encoded at once (texts: twice as many per call); only the (I, T) matrices grow, I bounded
NO_SHARED_SPACE = "the system learnt no image-text space (train it with the itc loss)"


@dataclass
class MatchingSet:
    """The held-out images matching is measured on (the first protocol.matching_images), in the loader's groups,
    with each image's true caption (its first reference) and that caption's hard negatives."""

    split: str
    groups: list[Any]  # prefixcap.data.loader.Items: pixels, RGB arrays (for the reference CLIP), references
    texts: list[str]  # the distinct true captions: what images retrieve, and what retrieves images
    caption_of: list[int]  # (I,) each image's caption, as a position in texts
    negatives: list[list[str]] | None  # (I,) each image's hard negatives; None: the data set has none
    why_no_negatives: str | None = None

    @property
    def captions(self) -> list[str]:
        return [self.texts[t] for t in self.caption_of]

    def facts(self) -> dict[str, Any]:
        contested = [n for n in self.negatives or [] if n]
        return {"split": self.split, "images": len(self.caption_of), "captions": len(self.texts),
                "hard_negative_images": len(contested),
                "negatives_per_image": sum(map(len, contested)) / len(contested) if contested else None,
                "why_no_hard_negatives": self.why_no_negatives}  # fmt: skip


def matching_set(source: Any, system: Any, limit: int, rgb: bool) -> MatchingSet | None:
    """The first ``limit`` readable images of the held-out split (test, else val, as the run's evaluation picks);
    None when the data has neither."""
    from prefixcap.data.loader import EvalItems, Preprocess, index_split, loader

    split = index_split(source, "test", limit)
    split = split if len(split) else index_split(source, "val", limit)
    items = loader(EvalItems(split, Preprocess(system.encoder), rgb=rgb), workers=0, batch_size=MATCH_BATCH)
    groups = [group for group in items if len(group)]
    if not groups:
        return None
    captions = [refs[0] for group in groups for refs in group.references]
    texts = list(dict.fromkeys(captions))
    position = {text: t for t, text in enumerate(texts)}
    rows = [row for group in groups for row in group.rows]
    negatives, why = source_hard_negatives(source, split.name, rows, captions)
    return MatchingSet(split.name, groups, texts, [position[c] for c in captions], negatives, why)


def source_hard_negatives(source: Any, split: str, rows: Sequence[int], captions: Sequence[str]
                   ) -> tuple[list[list[str]] | None, str | None]:  # fmt: skip
    """Each row's hard negatives from the data set (DatasetSource.hard_negatives), or (None, why there are none)."""
    found = []
    for row, caption in zip(rows, captions):
        try:
            edits = source.hard_negatives(split, row)
        except NotImplementedError as e:  # the interface's default: the data set offers none
            return None, str(e) or f"the {type(source).__name__} data set has no hard negatives"
        if not isinstance(edits, list) or not all(isinstance(e, str) for e in edits):
            raise MatchingError(f"{type(source).__name__}.hard_negatives({split!r}, {row}) returned "
                             f"{type(edits).__name__}; it must return a list of strings")  # fmt: skip
        # An edit equal to the truth could only tie with it; an empty one cannot be scored.
        found.append([e for e in dict.fromkeys(edits) if e.strip() and e != caption])
    return (found, None) if any(found) else (None, "the data set gave no hard negatives for these images")


def _figures(matrix: Any, mset: MatchingSet, true: list[float], negatives: list[Any]) -> dict[str, float | None]:
    from prefixcap.retrieval import hard_negative_accuracy, padded, retrieval

    values: dict[str, float | None] = dict(retrieval(matrix, mset.caption_of, range(len(mset.texts))))
    values["hard_negative_accuracy"] = hard_negative_accuracy(true, padded(negatives)) if true else None
    return values


def system_matching(system: Any, mset: MatchingSet) -> dict[str, dict[str, float | None]]:
    """{score kind: figures} of a system, scored with prefixcap.score's TorchScorer: every held-out image against
    every distinct caption, and each image's caption against its own hard negatives."""
    import numpy as np

    from prefixcap.score import TorchScorer
    from prefixcap.scoring import score_groups

    scorer, training = TorchScorer(system), system.training
    matrices = {kind: np.full((len(mset.caption_of), len(mset.texts)), np.nan) for kind in scorer.kinds}
    true: dict[str, list[float]] = {kind: [] for kind in scorer.kinds}
    negative: dict[str, list[Any]] = {kind: [] for kind in scorer.kinds}
    captions, start = mset.captions, 0
    try:
        for group in mset.groups:
            state, end = scorer.prepare_pixels(group.x), start + len(group)
            for j in range(0, len(mset.texts), 2 * MATCH_BATCH):
                for kind, value in scorer.score(state, mset.texts[j : j + 2 * MATCH_BATCH]).items():
                    matrices[kind][start:end, j : j + 2 * MATCH_BATCH] = value
            if mset.negatives is not None:
                contests = [[captions[i], *mset.negatives[i]] for i in range(start, end)]  # the truth first
                for scores in score_groups(scorer, state, contests, chunk=2 * MATCH_BATCH):
                    for kind in scorer.kinds:
                        if len(scores[kind]) > 1:  # an image without negatives has no contest
                            true[kind].append(float(scores[kind][0]))
                            negative[kind].append(scores[kind][1:])
            start = end
    finally:
        system.train(training)
    return {kind: _figures(matrices[kind], mset, true[kind], negative[kind]) for kind in scorer.kinds}


def clip_matching(clip: Any, mset: MatchingSet) -> dict[str, float | None]:
    """The same figures from a CLIP-style dual encoder (the data's CLIPScore model): cosines of its own image and
    text embeddings, texts prefixed as CLIPScore prefixes them (the shapes CLIP was trained so)."""
    import torch
    from PIL import Image

    from prefixcap.metrics.clipscore import PROMPT

    images = torch.cat([clip.image_embeddings([Image.fromarray(rgb) for rgb in group.rgb]) for group in mset.groups])
    matrix = (images @ clip.text_embeddings([PROMPT + t for t in mset.texts]).T).numpy()  # (I, T)
    true, negative = [], []
    for i, (caption, edits) in enumerate(zip(mset.captions, mset.negatives or [])):
        if edits:
            cosines = (clip.text_embeddings([PROMPT + t for t in [caption, *edits]]) @ images[i]).numpy()
            true.append(float(cosines[0]))
            negative.append(cosines[1:])
    return _figures(matrix, mset, true, negative)


def measure_matching(system: Any, source: Any, limit: int, clip: Any = None) -> dict[str, Any]:
    """An entry's matching figures (and, given ``clip``, the reference's), with the facts of the set they are on."""
    from prefixcap.scoring import KINDS

    tic = time.perf_counter()
    mset = matching_set(source, system, limit, rgb=clip is not None)
    if mset is None:
        return {"scores": dict.fromkeys(KINDS), "why": dict.fromkeys(KINDS, "the data has no readable held-out images")}
    found = system_matching(system, mset)
    scores = {kind: found.get(kind) for kind in KINDS}
    why = {kind: NO_SHARED_SPACE for kind in KINDS if kind not in found}
    out = {**mset.facts(), "scores": scores, "why": why}
    if clip is not None:
        out["reference"] = {"model": clip.checkpoint, "scores": clip_matching(clip, mset)}
    return {**out, "seconds": time.perf_counter() - tic}
