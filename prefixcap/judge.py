"""The system judges its own captions (`prefixcap caption --rerank K --min-score S`): it writes K candidates per
image, keeps the one it ranks best, and marks a caption whose score is below S as unsure, for a reviewer to check
rather than a page to present as fact.

Candidates are the greedy caption and K - 1 sampled ones (duplicates dropped): sampling offers other readings of the
image. They are ranked by the caption's mean log-likelihood given the image plus its contrastive score (RANK_BY
"auto"), not by the generative score alone: that score subtracts what the system expects of a blank image, which is
right for judging a given text but, as a ranking of samples, rewards the improbable ones (on an early quickstart
checkpoint it picked the right scene for 51.5% of images where greedy had 79%; likelihood + contrastive 81.5%:
benchmarks/rerank.py). The flag (and the row's score) is one score type's: contrastive when the system learnt it,
whose calibrated default flags few captions and mostly wrong ones, else generative.

Nothing here imports torch: with the ONNX scorer, --min-score judges the ONNX captioner's captions without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from prefixcap.errors import PrefixcapError
from prefixcap.scoring import preferred_kind, score_groups


class JudgeError(PrefixcapError):
    """The captions cannot be judged as asked: no such score type, no calibrated default."""


@dataclass
class Judged:
    caption: str
    score: float  # of the judge's kind
    unsure: bool | None  # None: no --min-score to compare with


RANK_BY = ("auto", "generative", "contrastive", "likelihood")


class Judge:
    """Scores captions with a scorer (prefixcap.score_rows.Scorer that also has score_pairs, as TorchScorer and
    OnnxScorer do) and reranks candidates; ``min_score`` None flags nothing."""

    def __init__(self, scorer: Any, *, kind: str | None = None, min_score: float | None = None, rerank: int = 1,
                 rank_by: str = "auto"):  # fmt: skip
        if rerank < 1:
            raise ValueError(f"rerank must be at least 1, got {rerank}")
        if rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, not {rank_by!r}")
        self.scorer, self.rerank, self.min_score, self.rank_by = scorer, rerank, min_score, rank_by
        self.kind = kind or preferred_kind(tuple(scorer.kinds))
        for wanted in (self.kind, rank_by):
            if wanted in ("generative", "contrastive") and wanted not in scorer.kinds:
                raise JudgeError(f"this system has no {wanted} score (it has {', '.join(scorer.kinds)}); train it "
                                 "with the itc loss for a contrastive one")  # fmt: skip

    @staticmethod
    def calibrated(calibration: dict[str, Any] | None, kind: str) -> float:
        """The calibrated default of ``kind`` a run measured and saved (prefixcap.score.calibrate)."""
        found = (calibration or {}).get(kind)
        if found is None:
            raise JudgeError(f"this system carries no calibrated {kind} --min-score (systems trained before it was "
                             "measured, or with no validation split): give a number, e.g. --min-score 0")  # fmt: skip
        return float(found["min_score"])

    def caption(self, captioner: Any, images: list[Image.Image], generate: dict[str, Any]) -> list[Judged]:
        """Each image's best candidate, its score, and whether it is unsure."""
        candidates = self.candidates(captioner, images, generate) if self.rerank > 1 else \
            [[c] for c in captioner.caption(images, **generate)]  # fmt: skip
        out = []
        for own, scores in zip(candidates, self.score(images, candidates)):
            best = int(np.argmax(self.rank(scores))) if len(own) > 1 else 0
            score = float(scores[self.kind][best])
            out.append(Judged(own[best], score, None if self.min_score is None else score < self.min_score))
        return out

    def rank(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The ranking value of each candidate (higher is better), from its scores (``score``)."""
        if self.rank_by != "auto":
            return scores[self.rank_by]
        return scores.get("likelihood", 0) + scores.get("contrastive", 0)

    def candidates(self, captioner: Any, images: list[Image.Image], generate: dict[str, Any]) -> list[list[str]]:
        """Each image's caption as ``generate`` asks, then up to ``rerank - 1`` sampled ones not already there."""
        candidates = [[c] for c in captioner.caption(images, **generate)]
        sampling = {k: v for k, v in generate.items() if k in ("max_new_tokens", "top_p", "temperature")}
        for _ in range(self.rerank - 1):
            for own, extra in zip(candidates, captioner.caption(images, **{**sampling, "do_sample": True})):
                if extra.strip() and extra not in own:
                    own.append(extra)
        return candidates

    def score(self, images: list[Image.Image], candidates: Sequence[Sequence[str]]) -> list[dict[str, np.ndarray]]:
        """Each image's candidates' scores, {kind: (K_i,)} with "likelihood" too when the scorer gives it; an empty
        caption scores -inf."""
        kept = [[i for i, text in enumerate(texts) if text.strip()] for texts in candidates]
        found = score_groups(self.scorer, self.scorer.prepare(images), [[candidates[g][i] for i in idx]
                                                                        for g, idx in enumerate(kept)])  # fmt: skip
        out = []
        for texts, idx, values in zip(candidates, kept, found):
            row = {kind: np.full(len(texts), -np.inf) for kind in values or (self.kind, "likelihood")}
            for kind, value in values.items():
                row[kind][idx] = value
            out.append(row)
        return out
