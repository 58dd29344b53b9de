"""The frozen encoder's features: computed once per (encoder weights, preprocessing, images), kept in shards on disk,
read back a row at a time.

    $PREFIXCAP_CACHE/features/<key>/shard-00000.safetensors   "features" (R, N, D), "ok" (R,): 0 = unreadable image
                                   /shard-00001.safetensors   ...
                                   /done.json                 written last: the cache is complete
    $PREFIXCAP_CACHE/features/<key>.lock                       held by the one process building it

Memory stays flat at any dataset size. A shard is written as it is encoded, straight to its file (the safetensors
layout, so any safetensors reader opens it), and rows are read back with positioned reads of their own bytes rather
than through a memory map, whose touched pages would count against the process until it ended. A killed build
leaves whole shards (each is renamed into place when complete) and the next build starts after the last of them,
removing the killed builder's temporary; a second process that wants the same cache waits for the builder's lock
and then reads what it wrote. Features are stored in fp16 by default: half the disk and I/O of fp32, and well inside
the precision a connector trains at.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prefixcap.data.rows import prefixcap_cache
from prefixcap.errors import PrefixcapError
from prefixcap.files import is_temporary, sweep_temporaries, write_atomic
from prefixcap.interfaces import Encoder, Rows

FORMAT = "features-1"  # in every key: a new layout never reads an old one
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}
SHARD_BYTES = 64 << 20  # a shard's features; the write buffer is one encoder batch, not the shard


class CacheError(PrefixcapError):
    """A cache file is not what its name says (damaged, truncated); it is rebuilt, never trusted."""


def cache_root() -> Path:
    return prefixcap_cache() / "features"


def encoder_digest(encoder: Encoder) -> str:
    """The encoder's weights and preprocessing, hashed: features depend on exactly these (and on the images)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        # reshape: a 0-dim tensor (BatchNorm's num_batches_tracked) has no last dimension to view as bytes
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(encoder.preprocessing).encode())  # the recipe's resize mode too: letterbox is not squash
    return h.hexdigest()


def cache_key(encoder: Encoder, rows: Rows, dtype: str) -> str:
    parts = (FORMAT, encoder_digest(encoder), rows.identity(), dtype)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


# --- one shard file -------------------------------------------------------------------------------------------------


def _header(rows: int, shape: tuple[int, int], dtype: torch.dtype) -> bytes:
    nbytes = rows * shape[0] * shape[1] * dtype.itemsize
    header = {"features": {"dtype": _SAFETENSORS[dtype], "shape": [rows, *shape], "data_offsets": [0, nbytes]},
              "ok": {"dtype": "U8", "shape": [rows], "data_offsets": [nbytes, nbytes + rows]}}  # fmt: skip
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data that follows to 8 bytes
    return struct.pack("<Q", len(text)) + text


class _ShardWriter:
    """One shard, streamed to a temporary file batch by batch and renamed into place when complete."""

    def __init__(self, path: Path, rows: int, shape: tuple[int, int], dtype: torch.dtype):
        self.path, self.rows, self.dtype = path, rows, dtype
        self.zero = torch.zeros(shape, dtype=dtype)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.file = self.tmp.open("wb")
        self.file.write(_header(rows, shape, dtype))
        self.ok = bytearray()

    def write(self, features: Sequence[Tensor | None]) -> None:
        """The next rows in order; None for an image that could not be read (zeros, marked not ok)."""
        for row in features:
            tensor = self.zero if row is None else row.to(self.dtype).contiguous()
            self.file.write(tensor.view(torch.uint8).numpy().tobytes())
            self.ok.append(row is not None)

    def close(self) -> None:
        if len(self.ok) != self.rows:
            raise RuntimeError(f"shard {self.path.name}: {len(self.ok)} rows written, {self.rows} expected")
        self.file.write(bytes(self.ok))
        self.file.flush()
        os.fsync(self.file.fileno())  # renamed only once on disk: a crash cannot publish a shard of zeros
        self.file.close()
        self.tmp.replace(self.path)

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class _Shard:
    path: Path
    rows: int
    data_start: int  # where the features' bytes begin in the file
    ok: np.ndarray  # (rows,) bool


def _open_shard(path: Path, shape: tuple[int, int], dtype: torch.dtype, rows: int) -> _Shard:
    """Check a shard's header against what it must hold; anything else is a damaged file (CacheError)."""
    expected = _header(rows, shape, dtype)
    size = len(expected) + rows * (shape[0] * shape[1] * dtype.itemsize + 1)
    try:
        with path.open("rb") as f:
            head = f.read(len(expected))
            if head != expected or os.fstat(f.fileno()).st_size != size:
                raise CacheError(f"{path}: not the shard this cache expects (damaged or truncated)")
            f.seek(size - rows)
            ok = np.frombuffer(f.read(rows), dtype=np.uint8).astype(bool)
    except OSError as e:
        raise CacheError(f"{path}: {e.strerror or e}") from None
    return _Shard(path, rows, len(expected), ok)


# --- the cache ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promise:
    """What a cache key stands for: so many rows of features of this shape and dtype. A cache that holds anything
    else (another build's files, a hand-edited done.json) is not that cache, however well it loads."""

    rows: int
    shape: tuple[int, int]
    dtype: torch.dtype


class FeatureCache:
    """A complete cache: ``read(rows)`` gives the features of those rows of the split as float32 (B, N, D)."""

    def __init__(self, directory: Path, promise: Promise | None = None):
        self.directory = directory
        try:
            done = json.loads((directory / "done.json").read_text())
            self.rows, self.rows_per_shard = int(done["rows"]), int(done["rows_per_shard"])
            self.shape, self.dtype = (int(done["shape"][0]), int(done["shape"][1])), DTYPES[done["dtype"]]
            if self.rows_per_shard < 1:
                raise ValueError(f"rows_per_shard {self.rows_per_shard}")
            if promise is not None and promise != Promise(self.rows, self.shape, self.dtype):
                raise CacheError(f"{directory}: does not hold what its key promises ({self.rows} rows of "
                                 f"{list(self.shape)} {done['dtype']}, not {promise.rows} rows of "
                                 f"{list(promise.shape)} {_name(promise.dtype)})")  # fmt: skip
            self.shards = [_open_shard(directory / _shard_name(s), self.shape, self.dtype, self._shard_rows(s))
                           for s in range(_shards(self.rows, self.rows_per_shard))]  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{directory}: incomplete or damaged feature cache ({e})") from None
        self.row_bytes = self.shape[0] * self.shape[1] * self.dtype.itemsize
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _shard_rows(self, s: int) -> int:
        return min(self.rows_per_shard, self.rows - s * self.rows_per_shard)

    def ok(self) -> np.ndarray:
        """(rows,) bool: False where the image could not be read when the cache was built."""
        return np.concatenate([s.ok for s in self.shards]) if self.shards else np.zeros(0, bool)

    def nbytes(self) -> int:
        return sum(s.path.stat().st_size for s in self.shards)

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a DataLoader worker forked with the parent's descriptors opens its own
            self._fds, self._pid = {}, os.getpid()
        if s not in self._fds:
            self._fds[s] = os.open(self.shards[s].path, os.O_RDONLY)
        return self._fds[s]

    def read(self, rows: Sequence[int]) -> Tensor:
        out = torch.empty((len(rows), *self.shape), dtype=self.dtype)
        view = out.view(len(rows), -1).view(torch.uint8).numpy()
        for k, row in enumerate(rows):
            s, offset = divmod(int(row), self.rows_per_shard)
            shard = self.shards[s]
            data = os.pread(self._fd(s), self.row_bytes, shard.data_start + offset * self.row_bytes)
            if len(data) != self.row_bytes:
                raise CacheError(f"{shard.path}: truncated while in use")
            view[k] = np.frombuffer(data, dtype=np.uint8)
        return out.float()

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own descriptors
        return {**self.__dict__, "_fds": {}}


def _name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _shards(rows: int, per: int) -> int:
    return -(-rows // per)


# --- building -------------------------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """A split's feature cache once it is complete; `prefixcap run` reports it (how big, how fast it was built)."""

    directory: Path
    dtype: str
    rows: int
    encoded: int  # rows encoded by this build (0: the cache was complete already)
    seconds: float
    nbytes: int

    @property
    def images_per_s(self) -> float | None:
        return self.encoded / self.seconds if self.encoded and self.seconds else None


Encode = Callable[[Tensor], Tensor]  # (B, 3, S, S) pixels -> (B, N, D) features


def load_or_build(key: str, rows: Rows, shape: tuple[int, int], dtype: str, encode: Encode,
                  batches: Callable[[range], Any], progress: Callable[[int, int], None] | None = None,
                  root: Path | None = None) -> tuple[FeatureCache, BuildReport]:  # fmt: skip
    """The cache named ``key`` for ``rows``, building what is missing. ``batches(range)`` yields lists of
    (row, pixels or None) in row order (DataLoader workers decode them); ``encode`` runs the encoder on a batch.
    OSError (a full or read-only disk) is the caller's to handle: the run goes on without a cache."""
    directory = (root or cache_root()) / key
    lock = directory.with_name(f"{key}.lock")
    torch_dtype = DTYPES[dtype]
    promise = Promise(len(rows), shape, torch_dtype)
    started = time.perf_counter()

    def complete(warn: bool = False) -> tuple[FeatureCache, BuildReport] | None:
        try:
            cache = FeatureCache(directory, promise)
        except CacheError as e:
            if warn and (directory / "done.json").exists():  # complete, but damaged or not this key's cache
                warnings.warn(f"{e}; rebuilding it", stacklevel=3)
            return None
        return cache, BuildReport(directory, dtype, cache.rows, 0, time.perf_counter() - started, cache.nbytes())

    if found := complete(warn=True):
        _sweep_if_idle(directory, lock)
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(lock) as exclusive:
        if found := complete():  # another process finished it while this one waited
            return found
        if exclusive:  # no live builder: a temporary here is what a killed one was writing
            sweep_temporaries(directory)
        (directory / "done.json").unlink(missing_ok=True)  # it vouches for files that are not this key's
        n = len(rows)
        per = max(1, SHARD_BYTES // (shape[0] * shape[1] * torch_dtype.itemsize))
        encoded = done_rows = 0
        for s in range(_shards(n, per)):
            span = range(s * per, min(n, (s + 1) * per))
            path = directory / _shard_name(s)
            try:
                _open_shard(path, shape, torch_dtype, len(span))
                done_rows += len(span)
                if progress:
                    progress(done_rows, n)
                continue  # written by a build that was stopped later: resume after it
            except CacheError as e:
                if path.exists():
                    warnings.warn(f"{e}; encoding its images again", stacklevel=2)
                path.unlink(missing_ok=True)
            writer = _ShardWriter(path, len(span), shape, torch_dtype)
            try:
                for batch in batches(span):
                    good = [pixels for _, pixels in batch if pixels is not None]
                    features = iter(encode(torch.stack(good)).cpu() if good else [])
                    writer.write([next(features) if pixels is not None else None for _, pixels in batch])
                    done_rows += len(batch)
                    if progress:
                        progress(done_rows, n)
                writer.close()
            except BaseException:
                writer.abandon()
                raise
            encoded += len(span)
        meta = {"rows": n, "rows_per_shard": per, "shape": list(shape), "dtype": dtype, "format": FORMAT}
        write_atomic(directory / "done.json", json.dumps(meta) + "\n")
    cache = FeatureCache(directory, promise)
    return cache, BuildReport(directory, dtype, n, encoded, time.perf_counter() - started, cache.nbytes())


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the build lock; yields whether it is really exclusive (False where the platform has no locks). With
    ``wait=False``, a lock another process holds raises BlockingIOError instead of being waited for."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; two builders then write identical shards, renamed atomically
        yield False
        return
    with path.open("a") as lock:
        # a second builder waits here, then finds the cache complete
        fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sweep_if_idle(directory: Path, lock_path: Path) -> None:
    """Remove temporaries killed builders left in a complete cache, when no builder holds its lock (a live one's
    temporary is its work in progress). Best effort: a read-only cache is still read."""
    if not any(is_temporary(p.name) for p in directory.iterdir()):
        return  # the usual case, without creating a lock file
    try:
        with _locked(lock_path, wait=False) as exclusive:
            if exclusive:
                sweep_temporaries(directory)
    except OSError:  # a builder at work, or a cache we may not write
        pass
