"""Why a run cannot start or go on."""

from __future__ import annotations

import signal
from pathlib import Path

from prefixcap.errors import PrefixcapError


class RunError(PrefixcapError):
    """A run cannot start or continue (unwritable directory, no data, diverged loss, ...)."""


class RunInterrupted(RunError):
    """SIGINT or SIGTERM stopped training after a complete step and a checkpoint; running again resumes there."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # what a shell reports for a process that signal ended
        then = (f"checkpoint {checkpoint} written: run the same command again to resume" if checkpoint else
                "no checkpoint yet: run the same command again to start over")  # fmt: skip
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; {then}")
