"""`prefixcap score`: a row for every (image, text) pair, streamed, whatever the number of either.

Images are read and encoded a group (--batch-size) at a time; the texts are read again, a chunk (--text-batch) at a
time, for every group, so neither is ever held whole: 10,000 texts against one image hold one chunk of texts and one
row of floats per image of the group. Texts from stdin are spooled to a temporary file first, since they are read
once per group. An image that cannot be read gets one row with its error, an empty text one row with its own; the
others are scored. Nothing here imports torch: with the ONNX scorer it never loads.

The scorer is duck-typed (prefixcap.score.TorchScorer, prefixcap.onnx_scorer.OnnxScorer):
    kinds: tuple[str, ...]
    prepare(images) -> state                          # a group of images, encoded once
    score(state, texts, images=None) -> {kind: (G, C) float array}
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO

import numpy as np
from PIL import Image

from prefixcap.caption import CAPTION_MAX_PIXELS, _json_line, escape_undecodable, expand_paths
from prefixcap.errors import ImageError, PrefixcapError, summary
from prefixcap.images import open_image

FORMATS = ("jsonl", "csv", "matrix")
EMPTY_TEXT = "the text is empty: there is nothing to score"


class ScoreError(PrefixcapError):
    """Scoring cannot start: no texts, an unreadable texts file, a score type the system does not have."""


class Scorer(Protocol):
    kinds: tuple[str, ...]

    def prepare(self, images: list[Image.Image]) -> Any: ...

    def score(self, state: Any, texts: list[str], images: list[int] | None = None) -> dict[str, np.ndarray]: ...


@dataclass
class ScoreRow:
    """One (image, text) pair's scores; ``error`` is None exactly when they are there. An unreadable image's row has
    no text (text_index None), an empty text's row no image (image None)."""

    image: str | None
    text_index: int | None
    text: str | None
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


# --- texts -----------------------------------------------------------------------------------------------------


# Texts are judged on their first MAX_TEXT_TOKENS tokens, which never take this many characters: a longer line
# (a file that is one huge line) is read up to here, so neither memory nor the rows it is echoed into grow with it.
MAX_LINE_CHARS = 4096


class Texts:
    """The texts to score, read again for every group of images: those given on the command line, or a file's
    lines (UTF-8, one text a line; a file of another encoding is refused when first read)."""

    def __init__(self, given: Sequence[str] = (), path: Path | None = None):
        if path is None and not given:
            raise ScoreError("give the texts to score: --text TEXT (repeatable) or --texts FILE")
        self.given, self.path = list(given), path
        if path is not None:
            try:
                with path.open("rb") as file:
                    file.read(1)
            except OSError as e:
                raise ScoreError(f"--texts {path}: {e.strerror or summary(e)}") from None

    def count(self) -> int:
        return sum(1 for _ in self._lines())

    def chunks(self, size: int) -> Iterator[list[tuple[int, str]]]:
        """(index, text) pairs, ``size`` at a time, in order."""
        chunk: list[tuple[int, str]] = []
        for item in enumerate(self._lines()):
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _lines(self) -> Iterator[str]:
        if self.path is None:
            yield from self.given
            return
        read = 0
        with self.path.open(encoding="utf-8", newline="") as file:
            try:
                while line := file.readline(MAX_LINE_CHARS):
                    read += 1
                    if not line.endswith("\n"):  # a line past the cap (or the last): skip the rest of it unread
                        while (rest := file.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                            pass
                    yield line.rstrip("\r\n")
            except UnicodeDecodeError as e:  # text is decoded a block at a time: the line is where reading stopped
                raise ScoreError(f"--texts {self.path}: line {read + 1} is not UTF-8 ({e.reason}); save the file as "
                                 "UTF-8") from None  # fmt: skip


@contextlib.contextmanager
def spooled_stdin(stream: BinaryIO | None = None) -> Iterator[Path]:
    """stdin copied to a temporary file, removed afterwards: the texts are read once per group of images."""
    with tempfile.TemporaryDirectory(prefix="prefixcap-texts-") as tmp:
        path = Path(tmp) / "texts.txt"
        with path.open("wb") as out:
            shutil.copyfileobj(stream or sys.stdin.buffer, out, 1 << 20)
        yield path


# --- scoring ---------------------------------------------------------------------------------------------------


def score_paths(scorer: Scorer, paths: Iterable[str | Path], texts: Texts, *, kinds: Sequence[str] | None = None,
                batch_size: int = 16, text_batch: int = 64) -> Iterator[ScoreRow]:  # fmt: skip
    """A row for every (image, text) pair, image by image in input order, each image's texts in order. ``paths``
    as `prefixcap caption` takes them (files, folders, globs: ``expand_paths``)."""
    if batch_size < 1 or text_batch < 1:
        raise ValueError("batch_size and text_batch must be at least 1")
    kinds = tuple(kinds or scorer.kinds)
    if missing := [k for k in kinds if k not in scorer.kinds]:
        raise ScoreError(f"this system has no {missing[0]} score (it has {', '.join(scorer.kinds)}); "
                         "train it with the itc loss for a contrastive one")  # fmt: skip
    if texts.count() == 0:
        raise ScoreError("there are no texts to score: the texts file is empty")
    empty_reported = False  # an empty text's row is written once, not once per group of images
    group: list[tuple[str, Image.Image | None, str | None]] = []
    for item in _read(paths):
        group.append(item)
        if len(group) < batch_size:
            continue
        yield from _score_group(scorer, group, texts, kinds, text_batch, report_empty=not empty_reported)
        empty_reported, group = True, []
    if group or not empty_reported:
        yield from _score_group(scorer, group, texts, kinds, text_batch, report_empty=not empty_reported)


def _read(paths: Iterable[str | Path]) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """(path, image, None), or (path, None, why it cannot be read), for every image file ``paths`` name."""
    for path, why in expand_paths(paths):
        if why is not None:
            yield path, None, why
            continue
        try:
            yield path, open_image(path, max_pixels=CAPTION_MAX_PIXELS), None
        except ImageError as e:
            yield path, None, e.reason


def _score_group(scorer: Scorer, group: list[tuple[str, Image.Image | None, str | None]], texts: Texts,
                 kinds: tuple[str, ...], text_batch: int, report_empty: bool) -> Iterator[ScoreRow]:  # fmt: skip
    """The group's rows. Its scores are gathered over every chunk of texts first, (G, texts) floats per kind, so
    that the rows come image by image; the texts are read a second time as the rows are written."""
    readable = [i for i, (_, image, error) in enumerate(group) if error is None and image is not None]
    errors: dict[int, str] = {i: error for i, (_, _, error) in enumerate(group) if error is not None}
    state, readable = _prepare(scorer, group, readable, errors)
    columns: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    for chunk in texts.chunks(text_batch):
        if report_empty:
            for index, text in chunk:
                if not text.strip():
                    yield ScoreRow(None, index, text, error=EMPTY_TEXT)
        if not readable:
            continue
        kept = [text for _, text in chunk if text.strip()]
        try:
            scored = scorer.score(state, kept) if kept else {k: np.zeros((len(readable), 0)) for k in kinds}
        except Exception as e:  # e.g. out of memory: the group's rows say so, the next group is scored
            for i in readable:
                errors[i] = f"scoring failed: {summary(e)}"
            readable = []
            continue
        for kind in kinds:
            columns[kind].append(np.asarray(scored[kind], dtype=np.float64))
    matrices = {kind: np.concatenate(parts, axis=1) for kind, parts in columns.items() if parts}
    for i, (path, _, _) in enumerate(group):
        if i in errors:
            yield ScoreRow(path, None, None, error=errors[i])
            continue
        g = readable.index(i)
        column = 0
        for chunk in texts.chunks(text_batch):
            for index, text in chunk:
                if not text.strip():
                    continue
                yield ScoreRow(path, index, text, {kind: float(m[g, column]) for kind, m in matrices.items()})
                column += 1


def _prepare(scorer: Scorer, group: list[tuple[str, Image.Image | None, str | None]], readable: list[int],
             errors: dict[int, str]) -> tuple[Any, list[int]]:  # fmt: skip
    """The readable images' state; when the group fails to encode, each image is tried alone and those that fail
    get an error row."""
    if not readable:
        return None, []
    try:
        return scorer.prepare([group[i][1] for i in readable]), readable  # type: ignore[misc]
    except Exception as e:
        if len(readable) == 1:
            errors[readable[0]] = f"encoding failed: {summary(e)}"
            return None, []
    kept = []
    for i in readable:
        try:
            scorer.prepare([group[i][1]])  # type: ignore[list-item]
            kept.append(i)
        except Exception as e:
            errors[i] = f"encoding failed: {summary(e)}"
    return (scorer.prepare([group[i][1] for i in kept]) if kept else None), kept  # type: ignore[misc]


# --- output ----------------------------------------------------------------------------------------------------


class ScoreWriter:
    """JSON lines or CSV (a header, then one pair a row), or a matrix of one score type: CSV with a row per image
    and a column per text (header: ``image``, the texts, ``error``; an empty text's column stays empty). Each row is
    flushed as it comes."""

    def __init__(self, stream: TextIO, fmt: str, kinds: Sequence[str], texts: Texts):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
        if fmt == "matrix" and len(kinds) != 1:
            raise ScoreError("--format matrix writes one score type: choose it with --kind")
        self.stream, self.fmt, self.kinds = stream, fmt, list(kinds)
        self.fields = ["image", "text_index", "text", *self.kinds, "error"]
        self.csv = csv.writer(stream) if fmt != "jsonl" else None
        self.width = texts.count()
        self._image: str | None = None  # the matrix row being filled
        self._cells: dict[int, float] = {}
        if self.fmt == "csv":
            self.csv.writerow(self.fields)  # type: ignore[union-attr]
        elif self.fmt == "matrix":
            header = (escape_undecodable(text) for chunk in texts.chunks(1024) for _, text in chunk)
            self.csv.writerow(["image", *header, "error"])  # type: ignore[union-attr]
        self.stream.flush()

    def write(self, row: ScoreRow) -> None:
        if self.fmt == "matrix":
            return self._matrix(row)
        scores = [None if (v := row.scores.get(k)) is None else round(v, 6) for k in self.kinds]
        values = [row.image, row.text_index, row.text, *scores, row.error]
        if self.csv is None:
            self.stream.write(_json_line(dict(zip(self.fields, values))))
        else:
            self.csv.writerow(["" if v is None else escape_undecodable(v) if isinstance(v, str) else v for v in values])
        self.stream.flush()

    def _matrix(self, row: ScoreRow) -> None:
        if row.image is None:
            return
        if row.image != self._image or row.text_index in self._cells:  # a new image (or the same one again)
            self.close()
            self._image = row.image
        if row.error is not None:
            self._flush(row.error)
        else:
            self._cells[row.text_index] = round(row.scores[self.kinds[0]], 6)  # type: ignore[index,arg-type]

    def close(self) -> None:
        """Writes the last matrix row; call it after the last row."""
        if self._image is not None:
            self._flush("")

    def _flush(self, error: str) -> None:
        cells = [self._cells.get(i, "") for i in range(self.width)]
        self.csv.writerow([escape_undecodable(self._image or ""), *cells, error])  # type: ignore[union-attr]
        self.stream.flush()
        self._image, self._cells = None, {}
