"""The events of a training run: one vocabulary for the driver, the master and every worker.

The loop, on all three sides (``[driver]``: the process that called ``train`` or ``vnodes run``;
``[master]``: the job's master; ``[worker]``: each worker process, or the one in-process worker of
``train(workers=1)``). Every name below is an ``Event``; ``on_<value>`` is its hook::

    [driver]  FIT_START                            # the master is up (a checkpoint, if any, loaded)
    [worker]  FIT_START                            # registered, engine built
              loop:
    [worker]      PLAN_REQUESTED                   # waits for the master
    [master]        EPOCH_FORMED                   # a membership change at a step boundary
    [master]        PLAN                           # a plan about to be sent; plugins add per-sample inputs
    [worker]      on RUN(e, s):
                      EPOCH_JOIN  (a new epoch)    # waits: rendezvous of every member, state broadcast
                      STEP_START                   # local work from here on
                      EVAL_START  (epoch ended)    # evaluation pass over this worker's nodes' shards
                      for v in my virtual nodes:
                          BATCH_LOADED             # batch of (s, v) on the device, about to run forward
                          LOSS_COMPUTED            # per-sample losses known: plugins' worker halves see them
                          BACKWARD_DONE
                      REDUCE                       # waits: all-reduce across the epoch's members
                      REDUCED                      # waits: the commit is sent; the master decides
    [master]        STEP_COMMITTED | STEP_ABORTED  # all members reported (plugins consume their reports)
    [worker]          STEP_COMMITTED -> apply      | STEP_ABORTED -> redo s in the next epoch
    [driver]        EVALUATED (eval_every)         # the job's evaluation with the weights of step s (before it)
    [driver]        STEP_END                       # callbacks and the progress display see step s
    [worker]      on CHECKPOINT:
                      CHECKPOINT_START -> CHECKPOINT_STAGED (temporary file written) -> CHECKPOINT
    [driver]        CHECKPOINT
    [worker]      on STOP: FIT_END
    [driver]  FIT_END

Who subscribes: ``Callback`` objects and the progress display (driver events), plugins' master
halves (master events, ``vnodes.scheduler.plugins``), fault injection (``faults.py``: any worker
event of a chosen step) and the hang watchdog (``watchdog.py``: which stretches of the worker loop
are waits on peers or the master, ``Event.waits``).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Optional


class Event(str, Enum):
    FIT_START = "fit_start"
    EPOCH_FORMED = "epoch_formed"
    PLAN = "plan"
    PLAN_REQUESTED = "plan_requested"
    EPOCH_JOIN = "epoch_join"
    STEP_START = "step_start"
    EVAL_START = "eval_start"
    BATCH_LOADED = "batch_loaded"
    LOSS_COMPUTED = "loss_computed"
    BACKWARD_DONE = "backward_done"
    REDUCE = "reduce"
    REDUCED = "reduced"
    STEP_COMMITTED = "step_committed"
    STEP_ABORTED = "step_aborted"
    STEP_END = "step_end"
    CHECKPOINT_START = "checkpoint_start"
    CHECKPOINT_STAGED = "checkpoint_staged"
    CHECKPOINT = "checkpoint"
    EVALUATED = "evaluated"
    FIT_END = "fit_end"

    @property
    def waits(self) -> Optional[bool]:
        """For the worker's watchdog: True if the loop waits on peers or the master from this event
        until the next one; False if it does local work; None for a point inside a local stretch
        (the work goes on: a virtual node's batch, forward, backward)."""
        if self in _WAITING:
            return True
        return None if self in _INNER else False


_WAITING = frozenset({Event.FIT_START, Event.PLAN_REQUESTED, Event.EPOCH_JOIN, Event.REDUCE, Event.REDUCED,
                      Event.FIT_END})
_INNER = frozenset({Event.BATCH_LOADED, Event.LOSS_COMPUTED, Event.BACKWARD_DONE, Event.CHECKPOINT_STAGED})

#: the events of a worker's loop, in loop order: what fault injection can target (``VNODES_FAULT``)
WORKER_EVENTS = (Event.PLAN_REQUESTED, Event.EPOCH_JOIN, Event.STEP_START, Event.EVAL_START, Event.BATCH_LOADED,
                 Event.LOSS_COMPUTED, Event.BACKWARD_DONE, Event.REDUCE, Event.REDUCED, Event.STEP_COMMITTED,
                 Event.STEP_ABORTED, Event.CHECKPOINT_START, Event.CHECKPOINT_STAGED, Event.CHECKPOINT)


@dataclasses.dataclass
class RunState:
    """What the driver's callbacks see. ``step`` counts applied steps."""

    step: int
    steps: int
    start_step: int
    samples_per_step: int
    loss: Optional[float] = None
    step_time_s: float = 0.0
    checkpoint_path: Optional[str] = None
    grad_norm: Optional[float] = None  # of the step's reduced gradient (before clipping)
    lr: Optional[float] = None  # the first parameter group's learning rate for the step
    skipped: bool = False  # precision="fp16": the step overflowed and the optimizer did not step
    skipped_steps: int = 0  # such steps so far in this run
    samples_per_s: Optional[float] = None  # the global batch over the time between the last two commits
    loss_spread: Optional[float] = None  # standard deviation of the virtual nodes' mean losses at the step
    last_commit_s: Optional[float] = None  # the master's clock at the previous commit (for samples_per_s)
    evaluation: Optional[dict[str, float]] = None  # the latest evaluation's metrics (JobSpec.eval_dataset)
    evaluation_step: int = -1  # the steps applied to the weights it evaluated
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # step_fn's metrics at the step (node means)


class Callback:
    """A driver-side observer: override the ``on_<event>`` methods you need. Callbacks never change
    training (plugins that do are ``vnodes.scheduler.plugins`` mutators)."""

    def on_fit_start(self, state: RunState) -> None: ...

    def on_step_end(self, state: RunState) -> None: ...

    def on_checkpoint(self, state: RunState) -> None: ...

    def on_evaluated(self, state: RunState) -> None: ...

    def on_fit_end(self, state: RunState) -> None: ...


def fire(callbacks: list[Callback], event: Event, state: RunState) -> None:
    for callback in callbacks:
        getattr(callback, f"on_{event.value}")(state)
