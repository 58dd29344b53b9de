"""Training: `prefixcap run` and what `prefixcap bench` builds on.

    run.py          start() and run(): the run directory, then the Run, then final/
    trainer.py      Run: the loop (micro-batches, accumulation, mixed precision, evaluation, early stopping)
    evaluate.py     captions and metrics for a split, streamed; the CLIPScore model
    state.py        checkpoints/step-N written and resumed; optim.py: AdamW, its schedule and state
    rundir.py       where a run writes, its lock, its files; signals.py: SIGINT/SIGTERM end the step first
    distributed.py  data parallelism under torchrun / accelerate launch
    events.py       what a run reports while it works (Started, Stepped, Evaluated, Resumed, Stopped)

The data path (splits, the feature cache, DataLoader workers) is prefixcap.data's.
"""

from prefixcap.training.errors import RunError, RunInterrupted
from prefixcap.training.evaluate import evaluate
from prefixcap.training.events import Evaluated, Resumed, Started, Stepped, Stopped
from prefixcap.training.run import RunResult, run, start
from prefixcap.training.rundir import latest_checkpoint
from prefixcap.training.trainer import Run

__all__ = ["Evaluated", "Resumed", "Run", "RunError", "RunInterrupted", "RunResult", "Started", "Stepped",
           "Stopped", "evaluate", "latest_checkpoint", "run", "start"]  # fmt: skip
