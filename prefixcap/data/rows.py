"""Random access to a split without holding it: Arrow tables read memory-mapped, one row at a time.

`datasets` keeps a table on disk and maps it, so a split of any size costs the pages a worker is reading. Images stay
undecoded (`Image(decode=False)`: bytes or a path) until a DataLoader worker turns one into pixels through
prefixcap's own reader, with its limits, rather than through `datasets`' decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Example:
    image: Any  # PIL image, path, or array
    captions: list[str]  # one or more references


class Rows(ABC):
    """One split with random access, read one example at a time by the trainer's DataLoader workers, so that no
    split is ever held in memory. Captions are read without decoding the image (the trainer indexes a split by
    them); ``identity`` keys the feature cache, so it must change whenever any image may have changed."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def captions(self, index: int) -> list[str]: ...

    @abstractmethod
    def image(self, index: int) -> Any:
        """A PIL image, a path, encoded bytes or an array; an unreadable one raises (ImageError or anything)."""

    @abstractmethod
    def identity(self) -> str: ...


# Changing how a split is indexed or fingerprinted changes this, so nothing written by an older layout is reused.
FORMAT = "rows-1"


def prefixcap_cache() -> Path:
    return Path(os.environ.get("PREFIXCAP_CACHE", Path.home() / ".cache" / "prefixcap"))


def image_signature(value: Any) -> bytes:
    """What identifies an undecoded image: its bytes' digest, or its path with size and modification time (a file
    rewritten in place changes both), so a cache key need not decode a single image."""
    if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return hashlib.sha256(value).digest()
    if isinstance(value, (str, Path)):
        try:
            st = os.stat(value)
            return f"{os.path.abspath(value)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
        except OSError:
            return f"{os.path.abspath(value)}\0missing".encode()
    return repr(value).encode()


def row_captions(row: dict[str, Any], columns: list[str]) -> list[str]:
    """A row's references from its caption columns, each a caption or a list of them (Flickr8k-style sets keep one
    reference per column); anything but a string is dropped."""
    found: list[str] = []
    for column in columns:
        value = row[column]
        found += [value] if isinstance(value, str) else list(value or [])
    return [c for c in found if isinstance(c, str)]


def undecoded(value: Any) -> Any:
    """An Arrow image cell as something prefixcap.images reads: a path, or the file's bytes as a stream."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        return value.get("path")
    return value


class ArrowRows(Rows):
    """A `datasets.Dataset` with an image column and one or more caption columns (each a string or a list)."""

    def __init__(self, data: Any, image_column: str, caption_columns: list[str], identity: str | None = None):
        import datasets

        if isinstance(data.features.get(image_column), datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))
        self.images = data.select_columns([image_column])
        self.texts = data.select_columns(caption_columns)
        self.image_column, self.caption_columns = image_column, caption_columns
        self._identity = identity

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, index: int) -> list[str]:
        return row_captions(self.texts[int(index)], self.caption_columns)

    def image(self, index: int) -> Any:
        return undecoded(self.images[int(index)][self.image_column])

    def identity(self) -> str:
        if self._identity is None:
            # Every image's signature, read column-wise a thousand rows at a time: memory stays flat.
            h = hashlib.sha256(FORMAT.encode())
            for batch in self.images.iter(batch_size=1000):
                for value in batch[self.image_column]:
                    h.update(image_signature(value))
            self._identity = h.hexdigest()
        return self._identity


@contextlib.contextmanager
def quiet_datasets():
    """`datasets` draws its own progress bars while it writes a table: prefixcap reports progress itself."""
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()


def _spooled(examples: Iterable[Example]) -> Iterator[dict[str, Any]]:
    for example in examples:
        image = example.image
        if isinstance(image, Path):
            image = str(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, (str, Image.Image, bytes)):  # a tensor, say: kept as PNG like any array
            try:
                from prefixcap.images import to_rgb_tensor

                image = Image.fromarray(to_rgb_tensor(image).mul(255).round().byte().permute(1, 2, 0).numpy())
            except Exception:
                image = repr(image)  # unreadable later, counted as a broken image rather than failing the spool
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = {"bytes": buffer.getvalue(), "path": None}
        elif isinstance(image, bytes):
            image = {"bytes": image, "path": None}
        else:
            image = {"bytes": None, "path": image}
        yield {"image": image, "captions": [c for c in example.captions if isinstance(c, str)]}


def spool(examples: Iterable[Example]) -> ArrowRows | None:
    """Rows for a source that can only be iterated: its examples written once to an Arrow file in a temporary
    directory (removed with the returned rows), images as files' bytes or paths. None when there are none."""
    import datasets

    root = prefixcap_cache() / "spool"
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    directory = tempfile.mkdtemp(dir=root)
    owner = _own(Path(directory))
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "captions": datasets.Sequence(datasets.Value("string"))})  # fmt: skip
    iterator = iter(examples)
    try:
        first = next(iterator)
    except StopIteration:
        shutil.rmtree(directory, ignore_errors=True)
        return None

    def everything() -> Iterator[dict[str, Any]]:
        yield from _spooled([first])
        yield from _spooled(iterator)

    try:
        with quiet_datasets():
            data = datasets.Dataset.from_generator(everything, features=features, cache_dir=directory,
                                                   fingerprint=uuid.uuid4().hex)  # fmt: skip
    except BaseException as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise (e.__cause__ or e) if isinstance(e, datasets.exceptions.DatasetGenerationError) else e
    rows = ArrowRows(data, "image", ["captions"])
    weakref.finalize(rows, _release, directory, owner)  # the mapped file may be unlinked while in use
    return rows


# A killed process cannot remove its spool; the next spool does. Each directory's .owner file is locked by the
# process using it for as long as it lives (the lock dies with it), so an unlocked one was left by a dead process.
# The age check covers the instant between a new directory's creation and its lock.


def _own(directory: Path) -> Any:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; spools of killed runs stay until removed by hand
        return None
    owner = (directory / ".owner").open("a")
    fcntl.flock(owner, fcntl.LOCK_EX)
    return owner


def _release(directory: str, owner: Any) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    if owner is not None:
        owner.close()


def _sweep(root: Path, min_age_s: float = 10.0) -> None:
    try:
        import fcntl
    except ImportError:
        return
    for directory in root.iterdir():
        owner = directory / ".owner"
        try:
            if time.time() - owner.stat().st_mtime < min_age_s:
                continue
            with owner.open("a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: its process is alive
                shutil.rmtree(directory, ignore_errors=True)
        except OSError:
            continue
