"""What every scorer shares, without torch (the ONNX scorer never loads it): the score types, the longest text
scored, and the calibration of `--min-score`, which a saved system and an ONNX export carry in their manifests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

KINDS = ("generative", "contrastive")
# About 250 characters of English: twice the longest alt text. A longer text is judged on its start.
MAX_TEXT_TOKENS = 64


class KindCalibration(BaseModel):
    """A score type's default minimum: the score that ``1 - quantile`` of held-out reference captions reach."""

    model_config = ConfigDict(extra="forbid", strict=True)
    min_score: float
    quantile: float = Field(gt=0, lt=1)
    pairs: int = Field(ge=1)

    @field_validator("min_score")
    @classmethod
    def finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    generative: KindCalibration | None = None
    contrastive: KindCalibration | None = None


def parse_calibration(value: Any, where: str, error: type[Exception]) -> dict[str, dict[str, Any]] | None:
    """A manifest's ``score_calibration`` (a stranger's file): None when absent, else checked strictly, ``error``
    naming ``where`` when it is not what `prefixcap run` writes."""
    if value is None:
        return None
    try:
        parsed = Calibration.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(map(str, first["loc"]))
        raise error(f"{where}: score_calibration{'.' + at if at else ''}: {first['msg']}") from None
    return parsed.model_dump(exclude_none=True)


def preferred_kind(kinds: tuple[str, ...]) -> Literal["generative", "contrastive"]:
    """The score reranking and --min-score use by default: contrastive when the system learnt one."""
    return "contrastive" if "contrastive" in kinds else "generative"


def score_groups(scorer: Any, state: Any, groups: Sequence[Sequence[str]], chunk: int | None = None
                 ) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Each image's own texts scored against it alone (reranking, calibration, hard negatives): ``groups[g]`` are
    image ``g`` of ``state``'s texts; one {kind: (K_g,)} per image, with every kind ``scorer.score_pairs`` gives.
    ``chunk``: texts per call, for a vocabulary whose logits are the memory (default: all in one call)."""
    flat = [text for texts in groups for text in texts]
    owners = [g for g, texts in enumerate(groups) for _ in texts]
    step = chunk or max(len(flat), 1)
    parts = [scorer.score_pairs(state, flat[c : c + step], owners[c : c + step]) for c in range(0, len(flat), step)]
    scores = {kind: np.concatenate([part[kind] for part in parts]) for kind in (parts[0] if parts else {})}
    bounds = np.cumsum([0, *map(len, groups)])
    return [{kind: value[a:b] for kind, value in scores.items()} for a, b in zip(bounds[:-1], bounds[1:])]
