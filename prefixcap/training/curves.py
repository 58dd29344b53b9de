"""curves.png: training and validation loss, and the data's headline metric on a second axis when it has one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefixcap.interfaces import Metric


def plot_curves(history: list[dict[str, Any]], path: Path, headline: Metric | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss", lw=1)
    evals = [r for r in history if "val" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val"]["loss"] for r in evals], "o-", label="val loss")
        scored = [r for r in evals if headline and headline.name in r["val"]]
        if scored:
            twin = ax.twinx()
            twin.plot([r["step"] for r in scored], [r["val"][headline.name] for r in scored], "s-",
                      color="tab:green", label=f"val {headline.label}")  # fmt: skip
            if headline.bounds:
                twin.set_ylim(*headline.bounds)
            twin.set_ylabel(headline.label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
