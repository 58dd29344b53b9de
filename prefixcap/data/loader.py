"""A split as training and evaluation read it: an index of usable rows, and DataLoader workers that decode images.

Nothing here holds a split. `CaptionSet` keeps the positions of the rows worth reading (8 bytes an example); the
workers read one row at a time from the source's `Rows`, decode and preprocess it, and hand back a tensor. What the
data is for a given step is decided by pure functions of (seed, epoch, index), in the sampler, never by the order
in which workers finish: so a resumed run and an uninterrupted one see the same batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from prefixcap.data.cache import BuildReport, FeatureCache, cache_key, cache_root, load_or_build
from prefixcap.errors import summary
from prefixcap.images import ImageProcessor, to_rgb_tensor
from prefixcap.interfaces import DatasetSource, Encoder, Rows, System


@dataclass
class CaptionSet:
    """One split: its rows and which of them are used (a caption, and a readable image as far as is known)."""

    name: str
    rows: Rows | None
    kept: np.ndarray  # (N,) int64 positions in rows, in row order
    skipped: int = 0  # rows left out: no caption, or an image the feature cache could not read
    features: FeatureCache | None = None
    broken: set[int] = field(default_factory=set)  # rows whose image failed to decode in a worker, found on the way

    def __len__(self) -> int:
        return len(self.kept)

    def references(self, k: int) -> list[str]:
        return _usable(self.rows.captions(int(self.kept[k])))

    def use_features(self, cache: FeatureCache) -> None:
        """Train from ``cache`` and leave out the rows whose image it could not read."""
        ok = cache.ok()[self.kept]
        self.skipped += int((~ok).sum())
        self.kept, self.features = self.kept[ok], cache


def _usable(captions: Sequence[str]) -> list[str]:
    return [c for c in captions if c.strip()]


def index_split(source: DatasetSource, split: str, limit: int | None = None) -> CaptionSet:
    """The rows of ``split`` (the first ``limit`` of them) that have a caption; images are not opened here."""
    rows = source.rows(split)
    if rows is None:
        return CaptionSet(split, None, np.zeros(0, np.int64))
    n = len(rows) if limit is None else min(limit, len(rows))
    kept = np.fromiter((i for i in range(n) if _usable(rows.captions(i))), dtype=np.int64)
    return CaptionSet(split, rows, kept, skipped=n - len(kept))


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def pick_reference(seed: int, epoch: int, index: int, references: list[str]) -> str:
    """One reference per image per epoch, drawn afresh each epoch (more references, less overfitting)."""
    return references[random.Random(f"{seed}:{epoch}:{index}").randrange(len(references))]


def default_workers(decoding: bool) -> int:
    """Workers for images: one core for training, the rest (at most 8) decoding. Reading cached features is a few
    positioned reads a batch, cheaper in the training process than a worker's round trip."""
    if not decoding:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def decode(rows: Rows, row: int, processor: Preprocess | ImageProcessor, rgb: bool = False) -> tuple[Tensor | None, Any]:
    """(pixels, RGB uint8 array or None) of one row; (None, None) for an image that cannot be read, which costs
    that example, never the run."""
    try:
        image = to_rgb_tensor(rows.image(row))
        pixels = processor.one(image)
    except Exception:  # a decoder may raise anything on a malformed file; ImageError is the common case
        return None, None
    return pixels, (image.mul(255).round().byte().permute(1, 2, 0).numpy() if rgb else None)


@dataclass
class Item:
    row: int  # position in the split's rows
    caption: str
    references: list[str]
    x: Tensor | None  # pixels or features; None: the image could not be read
    rgb: Any = None
    seconds: float = 0.0  # spent reading it, for the data path's images/s


@dataclass
class Items:
    """A batch as a worker hands it over: the readable items' tensors stacked into one (one transfer, and pinnable),
    their metadata in order, and the rows whose image could not be read."""

    rows: list[int]
    captions: list[str]
    references: list[list[str]]
    x: Tensor | None  # (B, ...) of the readable items; None when none was
    rgb: list[Any]
    broken: list[int]
    seconds: float
    size: int  # items asked for, readable or not

    def __len__(self) -> int:
        return len(self.rows)

    def pin_memory(self) -> Items:  # called by the DataLoader's pinning thread when it feeds a GPU
        if self.x is not None:
            self.x = self.x.pin_memory()
        return self


def collate(items: list[Item] | Items) -> Items:
    if isinstance(items, Items):  # made whole by the dataset's __getitems__
        return items
    good = [item for item in items if item.x is not None]
    return Items(rows=[item.row for item in good], captions=[item.caption for item in good],
                 references=[item.references for item in good],
                 x=torch.stack([item.x for item in good]) if good else None, rgb=[item.rgb for item in good],
                 broken=[item.row for item in items if item.x is None], seconds=sum(item.seconds for item in items),
                 size=len(items))  # fmt: skip


class TrainItems(Dataset):
    """Item (epoch, k): example k of the set with the reference drawn for it in that epoch."""

    def __init__(self, split: CaptionSet, seed: int, processor: Preprocess | ImageProcessor):
        self.split, self.seed, self.processor = split, seed, processor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        tic = time.perf_counter()
        epoch, k = key
        row = int(self.split.kept[k])
        references = self.split.references(k)
        caption = pick_reference(self.seed, epoch, k, references)
        if self.split.features is not None:
            x = self.split.features.read([row])[0]
        else:
            x, _ = decode(self.split.rows, row, self.processor)
        return Item(row, caption, references, x, seconds=time.perf_counter() - tic)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Items | list[Item]:
        """A whole batch at once (the DataLoader asks for it so): from cached features, one read into one tensor
        instead of a tensor per example, which keeps the data path's share of a small model's step small."""
        if self.split.features is None:
            return [self[key] for key in keys]
        tic = time.perf_counter()
        rows = [int(self.split.kept[k]) for _, k in keys]
        references = [self.split.references(k) for _, k in keys]
        captions = [pick_reference(self.seed, epoch, k, refs) for (epoch, k), refs in zip(keys, references)]
        x = self.split.features.read(rows)
        return Items(rows, captions, references, x, [None] * len(rows), [], time.perf_counter() - tic, len(rows))


class MicroBatches(Sampler):
    """This process's slice of micro-batch ``start``, ``start + 1``, ... of the endless stream of shuffled epochs."""

    def __init__(self, n: int, seed: int, batch_size: int, processes: int, rank: int, start: int):
        self.n, self.seed, self.batch_size, self.start = n, seed, batch_size, start
        self.per, self.rank = batch_size // processes, rank

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order: tuple[int, list[int]] = (-1, [])
        k = self.start
        while True:
            first = k * self.batch_size + self.rank * self.per
            keys = []
            for pos in range(first, first + self.per):
                epoch, offset = divmod(pos, self.n)
                if order[0] != epoch:
                    order = (epoch, epoch_order(self.seed, epoch, self.n))
                keys.append((epoch, order[1][offset]))
            yield keys
            k += 1


class EvalItems(Dataset):
    def __init__(self, split: CaptionSet, processor: Preprocess | ImageProcessor, rgb: bool):
        self.split, self.processor, self.rgb = split, processor, rgb

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int) -> Item:
        tic = time.perf_counter()
        row = int(self.split.kept[k])
        references = self.split.references(k)
        x, rgb = decode(self.split.rows, row, self.processor, self.rgb)
        return Item(row, references[0], references, x, rgb, time.perf_counter() - tic)


class RowImages(Dataset):
    """(row, pixels or None) of every row of a span, in order: what a feature-cache build encodes."""

    def __init__(self, rows: Rows, span: range, processor: Preprocess | ImageProcessor):
        self.rows, self.span, self.processor = rows, span, processor

    def __len__(self) -> int:
        return len(self.span)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None]:
        row = self.span[i]
        return row, decode(self.rows, row, self.processor)[0]


def _as_list(items: list[Any]) -> list[Any]:
    return items


def loader(dataset: Dataset, *, workers: int, batch_size: int | None = None, batch_sampler: Sampler | None = None,
           pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """Batches of ``Items`` (RowImages: lists of (row, pixels or None)), made in the workers."""
    collate_fn = _as_list if isinstance(dataset, RowImages) else collate
    # Its own generator: a DataLoader draws a seed for its workers when it starts, and from torch's global RNG that
    # draw would move the dropout masks of every later step (a resumed run would then differ from an uninterrupted
    # one). Nothing here is random; the seed is only drawn.
    options: dict[str, Any] = {"num_workers": workers, "collate_fn": collate_fn, "pin_memory": pin_memory,
                               "generator": torch.Generator().manual_seed(0)}  # fmt: skip
    if workers:
        options["prefetch_factor"] = 4
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **options)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)


class Preprocess:
    """What a DataLoader worker runs on each image: the encoder's ImageProcessor (a small picklable value), or the
    encoder's own ``preprocess`` where a plugin overrides it."""

    def __init__(self, encoder: Any):
        own = type(encoder).preprocess is not Encoder.preprocess if isinstance(encoder, Encoder) else False
        self.encoder, self.processor = (encoder if own else None), encoder.preprocessing

    def one(self, image: Tensor) -> Tensor:
        return self.encoder.preprocess([image])[0] if self.encoder is not None else self.processor.one(image)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True):
    """A bar with ETA on stderr while a long pass over the data runs; yields ``update(done, total)``."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    progress = Progress(*columns, console=Console(stderr=True))
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # shown only once there is work to show (a complete cache reports nothing)
            task = progress.add_task(description, total=total)
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        progress.stop()


@torch.no_grad()
def cache_features(system: System, split: CaptionSet, *, dtype: str = "fp16", batch_size: int = 32,
                   num_workers: int | None = None, report=None, show_progress: bool = False) -> BuildReport | None:  # fmt: skip
    """Read ``split`` from now on as the frozen encoder's cached features, building the cache first where it is
    missing or incomplete. A cache that cannot be written (a full or read-only disk) costs the cache, not the run:
    the split then stays pixels, encoded batch by batch. Returns the BuildReport, or None without a cache."""
    encoder = system.encoder
    encoder.eval()
    device = next(encoder.parameters()).device
    key = cache_key(encoder, split.rows, dtype)
    preprocess = Preprocess(encoder)
    n_workers = default_workers(decoding=True) if num_workers is None else num_workers

    def batches(span: range):
        return loader(RowImages(split.rows, span, preprocess), workers=n_workers, batch_size=batch_size)

    try:
        with progress_bar("caching encoder features", show_progress) as update:
            cache, built = load_or_build(key, split.rows, (encoder.num_tokens, encoder.dim), dtype,
                                         lambda pixels: encoder(pixels.to(device)), batches, update)  # fmt: skip
    except OSError as e:
        reason = e.strerror or summary(e)
        warnings.warn(f"cannot write the feature cache {cache_root()}: {reason}; training encodes every batch "
                      "instead (PREFIXCAP_CACHE moves the cache)", stacklevel=2)  # fmt: skip
        return None
    split.use_features(cache)
    if report is not None:
        report(built)
    return built


def fingerprint_update(h: Any, rows: Sequence[int], captions: Sequence[str]) -> None:
    """What `prefixcap bench` compares between systems: the same examples with the same captions, in order."""
    h.update(json.dumps([list(rows), list(captions)]).encode())
