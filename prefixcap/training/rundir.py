"""The run directory: where it is, that it is writable, that one run at a time writes it, what it holds.

    runs/<recipe>/
      .lock                  held (flock) by the run writing here; holds its pid
      recipe.resolved.yaml   every option spelled out
      log.jsonl              one line per logged step and per evaluation
      checkpoints/step-N/    system/ (as System.save), optimizer.safetensors, rng.safetensors, trainer_state.json
      final/                 the trained system (prefixcap.load); metrics.json, samples.jsonl, curves.png beside it
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

from prefixcap.errors import summary
from prefixcap.files import is_temporary, write_atomic
from prefixcap.recipe import Recipe
from prefixcap.training.errors import RunError


def recipe_name(recipe: Recipe) -> str:
    return Path(recipe.source).stem if recipe.source != "<dict>" else "run"


def resolve_run_dir(recipe: Recipe, given: str | Path | None) -> Path:
    """Where the run writes: ``given`` (--out), else the recipe's output.dir. A recipe file may come from anyone, so
    its own output.dir must stay under the working directory; a place outside it is the user's to choose, with --out
    or --set output.dir=..."""
    if given is not None:
        return Path(given)
    raw = recipe.output.dir
    try:
        path = Path(raw.format(recipe=recipe_name(recipe)))
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise RunError(f"{recipe.location(('output', 'dir'))}: output.dir {raw!r}: the only placeholder is "
                       f"{{recipe}} ({summary(e)})") from None  # fmt: skip
    from_file = recipe.source != "<dict>" and ("output", "dir") not in recipe._overridden
    if not from_file:
        return path
    outside = path.is_absolute() or ".." in path.parts
    resolved = None if outside else _resolved_outside(path)
    if outside or resolved is not None:
        where = f" (it resolves to {resolved})" if resolved is not None else ""
        raise RunError(f"{recipe.location(('output', 'dir'))}: output.dir {raw!r} leaves the working directory"
                       f"{where}; a recipe writes only below it unless you choose the place: --out DIR or --set "
                       "output.dir=DIR")  # fmt: skip
    return path


def _resolved_outside(path: Path) -> Path | None:
    """Where a relative ``path`` really leads, if that is outside the working directory (else None). Its text alone
    says nothing: a symlink on the way (runs/ -> /elsewhere) sends every write to the link's target."""
    here = Path.cwd().resolve()
    there = (here / path).resolve()
    return None if there.is_relative_to(here) else there


# What a run writes at the top of its directory; --fresh removes these and nothing else.
RUN_FILES = {".lock", "recipe.resolved.yaml", "log.jsonl", "checkpoints", "final", "metrics.json", "samples.jsonl",
             "curves.png", "tensorboard"}  # fmt: skip


def _written_by_a_run(name: str) -> bool:
    # besides RUN_FILES: a killed run's temporaries and the writability probe of prepare_run_dir
    return name in RUN_FILES or is_temporary(name) or name.startswith(".write-test-")


def refuse_foreign_files(run_dir: Path) -> None:
    """--fresh is refused on a directory holding anything a run does not write (checked before the lock is taken, so
    a refused directory is left exactly as it was)."""
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not _written_by_a_run(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"--fresh would delete a run's files in {run_dir}, which also holds files no run wrote "
                       f"({shown}): nothing was deleted; choose an empty directory with --out, or remove what you "
                       "do not need yourself")  # fmt: skip


def prepare_run_dir(run_dir: Path, fresh: bool) -> None:
    """Make ``run_dir`` ready to write. ``fresh`` removes what an earlier run wrote there, entry by entry, never the
    directory itself: output.dir may be "." or a source folder (a recipe is anyone's file), so a directory that holds
    anything a run does not write is refused instead, listing what it would have lost."""
    if fresh and run_dir.is_dir():
        refuse_foreign_files(run_dir)
        for entry in run_dir.iterdir():
            if entry.name == ".lock":
                continue  # held by this process (start() took it first), so a live run elsewhere is never raced
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:  # found now, not after an hour of training
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None


def lock_run_dir(run_dir: Path) -> IO[str] | None:
    """Hold run_dir/.lock for the life of the returned file: a second run on the same directory would interleave
    checkpoints and logs with this one, so it is refused. The lock dies with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one run per directory is then the user's to keep
        return None
    try:
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:  # a read-only directory that holds an earlier run
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise RunError(f"run directory {run_dir} is in use by another prefixcap run (pid {holder}): wait for it to "
                       "end, or choose another --out") from None  # fmt: skip
    try:  # the pid only names the holder for the refusal above, but a disk too full for it is full for the run
        os.ftruncate(lock.fileno(), 0)
        os.write(lock.fileno(), str(os.getpid()).encode())  # unbuffered: a failed write leaves nothing for close()
    except OSError as e:
        lock.close()
        raise RunError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    return lock


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def os_reason(error: BaseException) -> str:
    """Why a write failed, in a few words (safetensors wraps the OSError's text in its own message)."""
    return (error.strerror if isinstance(error, OSError) and error.strerror else None) or summary(error)
