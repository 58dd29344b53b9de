"""Image-text matching figures from score matrices (numpy only): retrieval recall@k and hard-negative accuracy.

A data set repeats captions (in the shapes world, two images of one scene share their caption), so a match is
caption equality, not position: an image's query is answered by any text equal to its caption, a text's by any
image it captions. Ties are counted against the system: a correct answer is within the top k only if fewer than k
wrong answers score at least as high, so a system that scores everything alike gets no credit, whatever order a
sort would happen to leave. NaN, a score that could not be computed, ranks below everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5)


def recall_at_k(matrix: np.ndarray, row_ids: Sequence[object], column_ids: Sequence[object],
                ks: Sequence[int] = KS) -> dict[int, float]:  # fmt: skip
    """{k: the share of rows whose best-scoring matching column is within their top k}: row r matches column c when
    ``row_ids[r] == column_ids[c]``. Every row needs a match. For (I, T) scores, image->text recall is
    ``recall_at_k(m, image_caption_ids, text_ids)``, text->image ``recall_at_k(m.T, text_ids, image_caption_ids)``."""
    scores = np.where(np.isnan(matrix), -np.inf, np.asarray(matrix, dtype=np.float64))
    if scores.ndim != 2 or scores.shape != (len(row_ids), len(column_ids)):
        raise ValueError(f"a ({len(row_ids)}, {len(column_ids)}) score matrix was expected, not {matrix.shape}")
    match = np.asarray(row_ids, dtype=object)[:, None] == np.asarray(column_ids, dtype=object)[None, :]
    if unmatched := np.flatnonzero(~match.any(1)).tolist():
        raise ValueError(f"row {unmatched[0]} matches no column: every query needs a right answer")
    best = np.where(match, scores, -np.inf).max(1)  # (R,) the best right answer's score
    # wrong answers scoring at least as high: ties go to the wrong answer
    rank = (~match & (scores >= best[:, None])).sum(1)  # (R,)
    return {k: float((rank < k).mean()) for k in ks}


def retrieval(matrix: np.ndarray, image_caption_ids: Sequence[object], text_ids: Sequence[object],
              ks: Sequence[int] = KS) -> dict[str, float]:  # fmt: skip
    """Both directions of an (images, texts) score matrix: {"i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ..., ...}."""
    i2t = recall_at_k(matrix, image_caption_ids, text_ids, ks)
    t2i = recall_at_k(np.asarray(matrix).T, text_ids, image_caption_ids, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def hard_negative_accuracy(true_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """The share of N examples whose true caption scores strictly above every one of its negatives: (N,) true
    scores, (N, M) negatives' scores, NaN where an example has fewer than M negatives. A tie is a miss; a NaN true
    score is a miss; an example with no negative at all is an error (there would be nothing to win)."""
    true = np.asarray(true_scores, dtype=np.float64)
    negatives = np.asarray(negative_scores, dtype=np.float64)
    if negatives.ndim != 2 or true.shape != (len(negatives),):
        raise ValueError(f"expected (N,) true scores and (N, M) negative scores, not {true.shape} and "
                         f"{negatives.shape}")  # fmt: skip
    if not len(true):
        raise ValueError("no examples to score")
    present = ~np.isnan(negatives)
    if empty := np.flatnonzero(~present.any(1)).tolist():
        raise ValueError(f"example {empty[0]} has no negative to compete with")
    strongest = np.where(present, negatives, -np.inf).max(1)
    return float((true > strongest).mean())  # NaN > x is False: a true score that failed is a miss


def padded(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged rows (each example's own number of negatives) -> an (N, M) array padded with NaN."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
