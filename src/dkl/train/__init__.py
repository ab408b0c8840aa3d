"""The training side: one loop for every recipe, and the interface a recipe implements.

- :mod:`dkl.train.task`: :class:`Task` (a recipe), :class:`RunContext` (what it may use of the
  run), :class:`StepContext`, :class:`Counters`;
- :mod:`dkl.train.loop`: :class:`Trainer` (fit, epoch, step, evaluate);
- :mod:`dkl.train.checkpoint`: atomic, hashed checkpoints, RNG states, which file a run folder
  means;
- :mod:`dkl.train.rundir`: one live run per folder (a lock), no finished run replaced by
  accident, the files a run is made from;
- :mod:`dkl.train.distributed`: process group, sums over ranks, rank seeds;
- :mod:`dkl.train.optim`: the optimiser and the lr schedule;
- :mod:`dkl.train.metrics`, :mod:`dkl.train.outputs`: running metrics, evaluation, run files.

Run a config with :func:`dkl.api.train`, which picks the recipe's task by name.
"""

from dkl.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dkl.train.loop import DivergenceError, Interrupted, NonFiniteLossError, Trainer
from dkl.train.metrics import evaluate_classifier
from dkl.train.optim import build_optimizer, build_scheduler, lr_factor
from dkl.train.outputs import plot_history
from dkl.train.task import Counters, RunContext, StepContext, Task

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "Counters",
    "DivergenceError",
    "Interrupted",
    "NonFiniteLossError",
    "RunContext",
    "StepContext",
    "Task",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "evaluate_classifier",
    "find_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "plot_history",
    "save_checkpoint",
]
