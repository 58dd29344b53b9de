"""Writes that are all or nothing: a file or directory is written beside its final name, flushed to disk, then
renamed over it.

A run can die at any instruction (SIGKILL, the OOM killer, a full disk, a power cut). Whatever it was writing, a
reader then finds the old version or the new one, never half of either: ``write_atomic`` for one file,
``publish_dir`` for a directory built in a ``temporary_sibling``. Leftover temporaries start with "." and end in
".tmp-<pid>" or ".old-<pid>", so a later run can ``sweep_temporaries``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Iterator, TextIO


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    tmp = path.parent / f".{path.name}.{kind}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a power cut (the file's own fsync does not cover its name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journalled by NTFS
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, directory: Path) -> Path:
    """Flush the complete directory ``tmp`` to disk and put it where ``directory`` was (replacing it)."""
    _fsync_tree(tmp)
    old = temporary_sibling(directory, "old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def write_atomic(path: Path, text: str) -> None:
    with open_atomic(path, newline=None) as f:
        f.write(text)


@contextlib.contextmanager
def open_atomic(path: Path, newline: str | None = "") -> Iterator[TextIO]:
    """A UTF-8 text stream to a temporary beside ``path``, fsynced and renamed over ``path`` when the block ends, or
    removed (and ``path`` left as it was) when it raises. Writers of the same ``path`` in other processes each get
    their own temporary: the last to finish wins, whole. ``newline`` as for ``open`` ("": written as given, which
    csv needs)."""
    tmp = temporary_sibling(path)
    stream = open(tmp, "w", encoding="utf-8", newline=newline)
    try:
        with stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TEMPORARIES = (".*.tmp-*", ".*.old-*")  # what temporary_sibling names: a write in progress, or a copy being replaced


def is_temporary(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TEMPORARIES)


def sweep_temporaries(directory: Path) -> list[Path]:
    """Remove what writes interrupted in ``directory`` (and one level down) left behind; returns what it removed."""
    patterns = [*TEMPORARIES, *(f"*/{pattern}" for pattern in TEMPORARIES)]
    found = [p for pattern in patterns for p in directory.glob(pattern)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
