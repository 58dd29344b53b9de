"""What a run tells its caller while it works: one type per kind of event, so that the CLI, bench and a notebook
render them by type instead of guessing from a dict's keys. ``report`` callbacks receive these (and the data path's
``data.cache.BuildReport``); log.jsonl keeps its own rows, which are the run's record, not its messages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefixcap.interfaces import Metric


@dataclass(frozen=True)
class Started:
    """Training starts at ``step`` (0, or where a resumed run left off) of ``total_steps``; ``compiled``: its first
    step compiles the system (train.compile)."""

    step: int
    total_steps: int
    compiled: bool = False


@dataclass(frozen=True)
class Resumed:
    checkpoint: Path


@dataclass(frozen=True)
class Stepped:
    """A logged training step; the rates cover the steps since this process started (or resumed)."""

    step: int
    loss: float
    lr: float
    samples_per_s: float
    data_images_per_s: float | None  # what the data path can deliver; None before it was timed


@dataclass(frozen=True)
class Evaluated:
    """Validation metrics at ``step``; ``headline`` is the data's own metric (DatasetSource.headline), if any."""

    step: int
    metrics: dict[str, float]
    headline: Metric | None = None

    def shown(self) -> dict[str, float]:
        """The few metrics a progress line has room for: loss, the data's headline, CIDEr and CLIP-S."""
        keys = ["loss", *([self.headline.name] if self.headline else []), "cider", "clip_s"]
        return {k: self.metrics[k] for k in keys if k in self.metrics}


@dataclass(frozen=True)
class Stopped:
    """Training ended before train.steps: early stopping (``reason`` says why)."""

    step: int
    reason: str
