"""Alt text for image files: expand paths, read each image robustly, caption in batches, tidy the text.

Nothing here imports torch at import time: with the ONNX captioner (`prefixcap caption --onnx`) torch never loads.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, TextIO

from PIL import Image

from prefixcap.errors import ImageError, PrefixcapError, summary
from prefixcap.files import open_atomic
from prefixcap.images import IMAGE_EXTENSIONS, open_image

if TYPE_CHECKING:
    from prefixcap.interfaces import System
    from prefixcap.judge import Judge
    from prefixcap.metrics.clipscore import ClipScorer
    from prefixcap.recipe import Recipe

FORMATS = ("jsonl", "csv", "text")
EMPTY_CAPTION = "the model wrote an empty caption"
# Images are shrunk to this as they are read (a JPEG decodes smaller): a batch of 16 holds 16 of these, not 16
# photos of 88 megapixels (5 GB). The models see 224 to 384 pixels a side, so this changes what they see very little.
CAPTION_MAX_PIXELS = 2048 * 2048


class CaptionError(PrefixcapError):
    """Captioning cannot start: no CLIPScore model to score with, an unwritable --out, ... (no such run or saved
    system is a SavedSystemError)."""


class Captioner(Protocol):
    """A System, or the ONNX captioner: RGB images in, one caption each out."""

    def caption(self, images: list[Image.Image], **generate: Any) -> list[str]: ...


@dataclass
class CaptionRow:
    """One input's result: ``error`` is None exactly when ``caption`` is usable alt text."""

    path: str
    caption: str | None
    error: str | None
    clip_s: float | None = None
    score: float | None = None  # the system's own score of its caption (prefixcap.judge), when asked for
    unsure: bool | None = None  # the score is below --min-score: for a reviewer to check, not to present as fact


# --- alt text --------------------------------------------------------------------------------------------------

# Screen readers already announce an image, so "an image of ..." only delays what it shows.
_FILLER = re.compile(
    r"(?:(?:this|it) is\s+)?(?:(?:an?|the|this)\s+)?(?:close-up\s+)?"
    r"(?:image|picture|pic|photo|photograph|illustration|graphic)\s+(?:of|showing|depicting|that shows)\s+",
    re.IGNORECASE,
)
_ENDINGS = (".", "?", "!")
_DANGLING = ",;:-–— "  # left at the end of a cut, or written before a closing full stop that never came
_LEADING_ON = frozenset({"a", "an", "the", "and", "or", "of", "with", "in", "on", "at", "to", "by", "for", "from"})


def tidy_alt_text(text: str, max_chars: int | None = 125) -> str:
    """``text`` as alt text: no leading "an image of" and the like, a capital first letter, one closing full stop
    (a closing ? or ! is kept), at most ``max_chars`` characters (cut at a word boundary; None: no limit). An empty
    caption stays empty, so that it can be reported rather than passed off as "."."""
    if max_chars is not None and max_chars < 2:
        raise ValueError(f"max_chars must be at least 2 (a letter and the full stop), got {max_chars}")
    text = " ".join(text.split())
    while (filler := _FILLER.match(text)) and filler.end() < len(text):
        text = text[filler.end() :]
    if max_chars is not None and len(text) > max_chars - (not text.endswith(_ENDINGS)):
        space = text.rfind(" ", 0, max_chars)  # the last word that fits with a full stop after it ends here
        if space > 0:
            words = text[:space].split(" ")
            while len(words) > 1 and words[-1].lower() in _LEADING_ON:  # not "On the left of a."
                words.pop()
            text = " ".join(words)
        else:
            text = text[: max_chars - 1]
    text = text.rstrip(_DANGLING)
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith(_ENDINGS) else text + "."


# --- inputs ----------------------------------------------------------------------------------------------------


def expand_paths(inputs: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """(path, None) for every image file the inputs name, in order: a file as given, a folder's image files
    (recursively, sorted), a glob pattern's image files (``**`` recursive, sorted); (input, why) for a folder or
    pattern that holds no image files. A missing file is passed on as given, for the reader to report."""
    for item in inputs:
        path, text = Path(item), str(item)
        if path.is_dir():
            found, why = sorted(p for p in path.rglob("*") if _is_image_file(p)), "folder holds no image files"
        elif not path.exists() and glob.has_magic(text):  # an existing file named like a pattern is that file
            found = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if _is_image_file(p))
            why = "pattern matches no image files"
        else:
            found, why = [path], ""
        if not found:
            yield text, why
        for p in found:
            yield (text if p is path else str(p)), None


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


# --- captioning ------------------------------------------------------------------------------------------------


def caption_paths(captioner: Captioner, paths: Iterable[str | Path], *, batch_size: int = 16, tidy: bool = True,
                  max_chars: int | None = 125, scorer: ClipScorer | None = None, judge: Judge | None = None,
                  **generate: Any) -> Iterator[CaptionRow]:  # fmt: skip
    """A row for every image file ``paths`` name (see ``expand_paths``), in input order, each batch's as soon as it
    is captioned. An input that cannot be read or captioned gets a row with ``error`` and never stops the others.

    ``generate`` goes to ``captioner.caption``; ``tidy`` applies ``tidy_alt_text(caption, max_chars)``; ``scorer``
    fills ``clip_s``, the CLIP-S of each usable caption; ``judge`` reranks candidates and fills ``score`` and
    ``unsure`` (prefixcap.judge)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    waiting: list[CaptionRow] = []  # input order: rows behind the first image still to be captioned wait for it
    batch: list[tuple[CaptionRow, Image.Image]] = []
    for path, why in expand_paths(paths):
        row = CaptionRow(path, None, why)
        if why is None:
            try:
                batch.append((row, open_image(path, max_pixels=CAPTION_MAX_PIXELS)))
            except ImageError as e:
                row.error = e.reason
        waiting.append(row)
        if 0 < len(batch) < batch_size:
            continue
        _complete(captioner, batch, generate, tidy, max_chars, scorer, judge)
        yield from waiting
        waiting, batch = [], []
    _complete(captioner, batch, generate, tidy, max_chars, scorer, judge)
    yield from waiting


def _complete(captioner: Captioner, batch: list[tuple[CaptionRow, Image.Image]], generate: dict[str, Any],
              tidy: bool, max_chars: int | None, scorer: ClipScorer | None, judge: Judge | None) -> None:  # fmt: skip
    if batch:
        _caption_batch(captioner, batch, generate, judge)
        _finish(batch, tidy, max_chars, scorer)


def _caption_batch(captioner: Captioner, batch: list[tuple[CaptionRow, Image.Image]], generate: dict[str, Any],
                   judge: Judge | None = None) -> None:  # fmt: skip
    images = [image for _, image in batch]
    try:
        if judge is None:
            captions = captioner.caption(images, **generate)
        else:
            judged = judge.caption(captioner, images, generate)
            captions = [j.caption for j in judged]
    except Exception as e:  # e.g. out of memory: one image at a time, so only the one the model cannot take fails
        if len(batch) == 1:
            batch[0][0].error = f"captioning failed: {summary(e)}"
        else:
            for one in batch:
                _caption_batch(captioner, [one], generate, judge)
        return
    for i, ((row, _), caption) in enumerate(zip(batch, captions, strict=True)):
        row.caption = caption
        if judge is not None and math.isfinite(judged[i].score):  # the caption as the system wrote it, untidied
            row.score, row.unsure = round(judged[i].score, 6), judged[i].unsure


def _finish(batch: list[tuple[CaptionRow, Image.Image]], tidy: bool, max_chars: int | None,
            scorer: ClipScorer | None) -> None:  # fmt: skip
    for row, _ in batch:
        if row.caption is not None:
            row.caption = tidy_alt_text(row.caption, max_chars) if tidy else row.caption
            if not row.caption.strip():
                row.error = EMPTY_CAPTION
    scored = [(row, image) for row, image in batch if row.error is None]
    if scorer is not None and scored:
        scores = scorer.score([image for _, image in scored], [row.caption or "" for row, _ in scored])
        for (row, _), value in zip(scored, scores.per_image_clip_s, strict=True):
            row.clip_s = value


# --- models ----------------------------------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_captioner(source: str | Path) -> System:
    """The saved system in ``source``: a run directory (its final/) or a directory written by ``System.save``; on
    the GPU when there is one."""
    from prefixcap.persist import load_system, saved_system_dir

    return load_system(saved_system_dir(source), _device())


def load_clip_scorer(recipe: Recipe | None, clip_model: str | None = None) -> ClipScorer:
    """``clip_model``, else the recipe's eval.clip_model, picked as `prefixcap run` picks it ("auto": the data's own
    scorer, e.g. prefixcap/shapes-clip for shapes, else the paper's CLIP ViT-B/32)."""
    from prefixcap.metrics.clipscore import ClipScorer, choose_clip_model
    from prefixcap.registry import create

    name = clip_model
    if name is None and recipe is not None:
        setting = recipe.eval.clip_model
        auto = setting == "auto" and recipe.data is not None
        source = create("dataset", recipe.data.name, recipe.data.options) if auto else None
        name = choose_clip_model(setting, getattr(source, "clip_model", None))
    if name is None:
        why = "an ONNX export names none" if recipe is None else "the saved recipe's eval.clip_model is null"
        raise CaptionError(f"no CLIPScore model to score with: {why}; name one with --clip-model")
    try:
        return ClipScorer.from_pretrained(name, _device())
    except PrefixcapError as e:
        raise CaptionError(f"{e} (--clip-model picks another CLIPScore model)") from e


# --- output ----------------------------------------------------------------------------------------------------


def check_out_file(out_file: str | Path, paths: Iterable[str | Path]) -> None:
    """A CaptionError if ``out_file`` is one of the images ``paths`` name (see ``expand_paths``): writing the rows
    there would destroy an image, before it is read or after. The same file by another name counts too."""
    out = Path(out_file)
    for path, why in expand_paths(paths):
        if why is None and _same_file(Path(path), out):
            raise CaptionError(f"--out {out_file} is one of the input images ({path}); write the rows elsewhere")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links, symlinks, ./ and ../ spellings
    except OSError:  # one of them does not exist (yet): compare the names it would have
        return a.resolve() == b.resolve()


@contextlib.contextmanager
def out_file_stream(out_file: str | Path) -> Iterator[TextIO]:
    """A stream for the rows that replaces ``out_file`` only once it is complete (``prefixcap.files.open_atomic``):
    a reader, or another command writing the same file, never sees half of it; a failed run leaves the old file."""
    stack = contextlib.ExitStack()
    try:
        stream = stack.enter_context(open_atomic(Path(out_file)))
    except OSError as e:  # only opening is the --out's fault; an error while captioning is reported as itself
        raise CaptionError(f"--out {out_file}: {e.strerror or summary(e)}") from None
    with stack:
        yield stream


# Escapes for --format text paths: no name can add a line or a cell, and undoing them gives the name's bytes back.
_TEXT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_TEXT_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a file name's bytes that are not UTF-8, as Python decodes them


def escape_text_path(path: str) -> str:
    """``path`` for a ``PATH<TAB>CAPTION`` line: backslash, tab, newline and carriage return as ``\\\\``,
    ``\\t``, ``\\n``, ``\\r``; other control characters, and bytes of the name that are not UTF-8, as ``\\xNN``."""
    return _TEXT_ESCAPED.sub(lambda m: _TEXT_ESCAPES.get(m[0]) or _hex_escape(m[0]), path)


def escape_undecodable(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 (lone surrogates, from ``os.fsdecode``) as ``\\xNN``: writable
    as UTF-8. Other characters are left as they are."""
    return _SURROGATE.sub(lambda m: _hex_escape(m[0]), text)


def _hex_escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_line(record: dict[str, Any]) -> str:
    # A lone surrogate is written as its JSON escape: valid JSON in UTF-8, and json.loads plus os.fsencode give the
    # name's bytes back.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(record, ensure_ascii=False)) + "\n"


class RowWriter:
    """Writes rows as JSON lines, CSV (with a header) or text (``PATH<TAB>CAPTION``), each flushed as it comes, so
    whoever reads a pipe sees every batch when it is done. Whatever a file name holds, a row stays one row of valid
    UTF-8: text paths are escaped (``escape_text_path``), CSV and JSON quote theirs, and bytes that are not UTF-8 are
    escaped in every format."""

    def __init__(self, stream: TextIO, fmt: str, score: bool = False, judged: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
        self.stream, self.fmt = stream, fmt
        self.fields = ["path", "caption", "error"] + (["clip_s"] if score else []) + (["score", "unsure"] if judged else [])
        self.csv = csv.writer(stream) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(self.fields)

    def write(self, row: CaptionRow) -> None:
        values = [getattr(row, field) for field in self.fields]
        if self.fmt == "jsonl":
            self.stream.write(_json_line(dict(zip(self.fields, values))))
        elif self.csv is not None:
            self.csv.writerow(["" if v is None else escape_undecodable(v) if isinstance(v, str) else v for v in values])
        else:
            text = f"error: {row.error}" if row.error is not None else row.caption or ""
            cells = [escape_text_path(row.path), escape_undecodable(" ".join(text.split()))]
            cells += [f"{row.clip_s:.4f}"] if row.clip_s is not None else []
            cells += [f"{row.score:.4f}"] if row.score is not None else []
            cells += ["unsure"] if row.unsure else []
            self.stream.write("\t".join(cells) + "\n")
        self.stream.flush()
