"""The driver loop that every launcher runs: keep the fleet of workers, report steps, until the end.

A launcher (``launcher.py``: processes on this machine; ``launcher_ray.py``: actors on a Ray
cluster) differs only in how it starts, watches and stops its workers: its ``Fleet``. The loop is
one::

    fire FIT_START
    until the job is done or failed:
        every fleet.poll_s: fleet.tend(master)     # start workers where there is room, reap the ended,
                                                   # raise if the job can no longer make progress
        wait for a commit (or 0.2 s); fire STEP_END for each committed step (CHECKPOINT for each
        newer checkpoint)
    fire FIT_END

The in-process launcher (``direct.py``: ``train(workers=1)``) has no fleet: its one worker runs in
the caller's thread, and the same ``Observer`` fires the callbacks after each of its calls.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Optional, Protocol, Sequence

from vnodes.runtime.checkpoint import checkpoint_path
from vnodes.runtime.events import Callback, Event, RunState, fire

from .master import Master


class Fleet(Protocol):
    """The workers one launcher keeps for one job."""

    poll_s: float  # how often ``tend`` runs

    def tend(self, master: Master) -> None:
        """Start, reap or replace workers.

        Raises:
            WorkersGone: the job cannot make progress with what is left (the loop ends with it).
        """

    def stop(self) -> None:
        """End every worker still running (the job is over, or the driver gives up)."""


def drive(master: Master, fleet: Fleet, callbacks: Sequence[Callback], state: RunState,
          run_dir: Optional[Path] = None) -> None:
    """Run the job to its end: tend ``fleet`` and fire the callbacks as steps commit.

    Raises:
        WorkersGone: from ``fleet.tend``.
    """
    observer = Observer(master, callbacks, state, run_dir)
    next_tend = 0.0
    fire(observer.callbacks, Event.FIT_START, state)
    try:
        while not master.done:
            if time.monotonic() >= next_tend:
                fleet.tend(master)
                next_tend = time.monotonic() + fleet.poll_s
            master.wait(lambda m: m.done or m.committed_count > observer.seen, timeout_s=0.2)
            observer.poll()
    finally:
        observer.poll()
        fire(observer.callbacks, Event.FIT_END, state)
        if master.host is not None:
            master.host.on_fit_end()


class Observer:
    """The driver's view of a master: fires ``STEP_END`` for every step committed since the last
    ``poll`` and ``CHECKPOINT`` when a newer checkpoint was written, in the caller's thread."""

    def __init__(self, master: Master, callbacks: Sequence[Callback], state: RunState,
                 run_dir: Optional[Path] = None):
        self.master, self.callbacks, self.state, self.run_dir = master, list(callbacks), state, run_dir
        self.seen = master.committed_count
        self.checkpoint_step = master.checkpoint_step
        # evaluations restored from a checkpoint were reported by the run that made them
        state.evaluation_step = max([state.evaluation_step, *(e["step"] for e in master.evaluations)])

    def poll(self) -> None:
        if not self.callbacks:
            self.seen, self.checkpoint_step = self.master.committed_count, self.master.checkpoint_step
            return
        self.seen = fire_commits(self.master, self.seen, self.callbacks, self.state)
        fire_evaluations(self.master, self.callbacks, self.state, self.master.step)
        if self.master.checkpoint_step > self.checkpoint_step:
            self.checkpoint_step = self.master.checkpoint_step
            if self.run_dir is not None:
                self.state.checkpoint_path = str(checkpoint_path(self.run_dir, self.checkpoint_step))
            fire(self.callbacks, Event.CHECKPOINT, self.state)


def fire_evaluations(master: Master, callbacks: Sequence[Callback], state: RunState, up_to: int) -> None:
    """Fire ``on_evaluated`` for each evaluation of the weights after ``up_to`` steps or fewer not
    seen yet, in step order (an evaluation of step s comes before step s's STEP_END)."""
    for evaluation in list(master.evaluations):
        if state.evaluation_step < evaluation["step"] <= up_to:
            state.evaluation_step = evaluation["step"]
            state.evaluation = {k: v for k, v in evaluation.items() if k != "step"}
            fire(list(callbacks), Event.EVALUATED, state)


def fire_commits(master: Master, seen: int, callbacks: Sequence[Callback], state: RunState) -> int:
    """Fire ``on_step_end`` for every step committed since the first ``seen``; return the new count."""
    new, count = master.committed_since(seen)
    for c in new:
        fire_evaluations(master, callbacks, state, c.step)
        elapsed = c.committed_at_s - state.last_commit_s if state.last_commit_s is not None else c.step_time_s
        state.last_commit_s = c.committed_at_s
        state.samples_per_s = state.samples_per_step / elapsed if elapsed > 0 else None
        losses = list(c.vnode_losses.values())
        state.loss_spread = statistics.pstdev(losses) if len(losses) > 1 else 0.0
        state.step, state.loss, state.step_time_s = c.step + 1, c.loss, c.step_time_s
        state.grad_norm = None if math.isnan(c.grad_norm) else c.grad_norm
        state.lr = None if math.isnan(c.lr) else c.lr
        state.skipped = c.skipped
        state.skipped_steps += int(c.skipped)
        state.metrics = dict(c.metrics)
        fire(list(callbacks), Event.STEP_END, state)
    return count
