"""An Explanation drawn as one PNG: the image, then one panel per word with its map over the image, labelled.

The map is drawn through the geometry that made the model's input (Explanation.placement): over the whole image for
squash, over the kept centre for crop (the cut-off edges show the image alone), and over the image but not its padding
for letterbox. Each panel's colours run from its own map's minimum to its maximum (a map is a distribution, so only
its shape says where the word looked); a cross marks the peak.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefixcap.explain import Explanation
from prefixcap.files import temporary_sibling

COLUMNS = 6  # panels a row
PANEL_INCHES = 2.0


def render(explanation: Explanation, image: Any, path: str | Path) -> Path:
    """Write the panels of ``explanation`` for ``image`` (the original, as a PIL image or an HxWx3 array) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    maps = explanation.word_maps().numpy()
    panels = 1 + len(explanation.words)
    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    aspect = height / width
    figure, axes = plt.subplots(rows, columns, squeeze=False,
                                figsize=(PANEL_INCHES * columns, PANEL_INCHES * aspect * rows + 0.6 + 0.3 * rows))  # fmt: skip
    # Where the model's square input lies over the original image: the map's extent in the image's pixels.
    size = explanation.input_size
    (left, top), (right, bottom) = explanation.to_image(0, 0), explanation.to_image(size, size)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= panels:
            continue
        ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest" if width < 256 else "antialiased")
        if k == 0:
            ax.set_title("image", fontsize=10)
        else:
            grid = maps[k - 1]
            ax.imshow(grid, extent=(left, right, bottom, top), cmap="inferno", alpha=0.6, interpolation="bilinear",
                      vmin=grid.min(), vmax=grid.max() if grid.max() > grid.min() else grid.min() + 1)  # fmt: skip
            x, y = explanation.peak(k - 1)
            ax.plot([x], [y], marker="+", color="cyan", markersize=10, markeredgewidth=2)
            ax.set_title(explanation.words[k - 1].text, fontsize=11)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    how = explanation.method + (", layers and heads averaged" if explanation.method == "attention" else "")
    how += ", through the encoder (rollout)" if explanation.extra.get("rollout") else ", no rollout"
    figure.suptitle(f"{explanation.caption}\n{how}", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    tmp = temporary_sibling(path).with_suffix(".png")  # whole or not at all, and never through a link put there
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class ExplainRow:
    """One input's result: ``error`` is None exactly when the caption and both files were written."""

    path: str
    caption: str | None = None
    png: str | None = None
    json: str | None = None
    error: str | None = None


def explain_paths(system: Any, paths: Sequence[str | Path], out_dir: str | Path, *, method: str = "attention",
                  resize: str | None = None, rollout: bool = True, per_layer: bool = False,
                  per_head: bool = False) -> Iterator[ExplainRow]:  # fmt: skip
    """Explain every image ``paths`` name (files, folders, patterns: prefixcap.caption.expand_paths), one at a time,
    writing ``<name>.explain.png`` and ``<name>.explain.json`` into ``out_dir``; a row each, in input order. An input
    that cannot be read or explained gets a row with ``error`` and never stops the others. An output name that is
    taken by an input, or by an earlier input's output, gets a number (``photo-2.explain.png``): nothing given is
    ever written over."""
    from prefixcap.caption import CAPTION_MAX_PIXELS, expand_paths
    from prefixcap.errors import ImageError, summary
    from prefixcap.explain import ExplainError, explain
    from prefixcap.files import write_atomic
    from prefixcap.images import open_image

    listed = list(expand_paths(paths))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken = {_key(Path(p)) for p, why in listed if why is None}
    for path, why in listed:
        row = ExplainRow(path, error=why)
        if why is None:
            try:
                image = open_image(path, max_pixels=CAPTION_MAX_PIXELS)
                found = explain(system, [image], method, resize=resize, rollout=rollout)[0]
            except ImageError as e:
                row.error = e.reason
            except ExplainError:
                raise  # the system cannot explain this way: no image will go better
            except Exception as e:  # e.g. out of memory on one huge image: the others go on
                row.error = f"explaining failed: {summary(e)}"
            else:
                png, js = _names(out, Path(path).stem, taken)
                record = {"image": path, **found.to_json(per_layer=per_layer, per_head=per_head)}
                write_atomic(js, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
                render(found, image, png)
                row.caption, row.png, row.json = found.caption, str(png), str(js)
        yield row


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def _names(out: Path, stem: str, taken: set[str]) -> tuple[Path, Path]:
    for n in itertools.count(1):
        base = stem if n == 1 else f"{stem}-{n}"
        png, js = out / f"{base}.explain.png", out / f"{base}.explain.json"
        if _key(png) not in taken and _key(js) not in taken:
            taken |= {_key(png), _key(js)}
            return png, js
    raise AssertionError("unreachable")
