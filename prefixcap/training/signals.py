"""SIGINT and SIGTERM end a run after the current step and a checkpoint, instead of wherever they land."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def signals_end_the_step(received: list[int]) -> Iterator[None]:
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption notice) are recorded in
    ``received[0]`` for the training loop to act on after its step (or, in a step accumulated over many
    micro-batches, between them: that step is then dropped)."""
    received[0] = 0

    def record(signum: int) -> None:
        received[0] = signum

    with _on_stop_signals(record):
        yield


@contextlib.contextmanager
def signals_raise(error: Callable[[int], BaseException]) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise ``error(signum)`` at once: for work that has no step to end
    after (the final evaluation), where the default would be a KeyboardInterrupt ("Aborted!", exit 1) or a silent
    death."""

    def stop(signum: int) -> None:
        raise error(signum)

    with _on_stop_signals(stop):
        yield


@contextlib.contextmanager
def _on_stop_signals(act: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, the first SIGINT or SIGTERM restores the previous handlers, so that a second one stops
    a run that is stuck the usual way, then calls ``act(signum)``."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals (a run started from a worker thread keeps the defaults)
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def handler(signum, frame) -> None:
        restore()
        act(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        restore()
