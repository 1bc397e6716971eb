"""The driver loop that every launcher runs: keep the fleet of workers, report steps, until the end.

A launcher (``launcher.py``: processes on this machine; ``launcher_ray.py``: actors on a Ray
cluster) differs only in how it starts, watches and stops its workers: its ``Fleet``. The loop is
one::

    fire FIT_START
    until the job is done or failed:
        every fleet.poll_s: fleet.tend(master)     # start workers where there is room, reap the ended,
                                                   # raise if the job can no longer make progress
        wait for a commit (or 0.2 s); fire STEP_END for each committed step
    fire FIT_END
"""

from __future__ import annotations

import time
from typing import Protocol, Sequence

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


def drive(master: Master, fleet: Fleet, callbacks: Sequence[Callback], state: RunState) -> None:
    """Run the job to its end: tend ``fleet`` and fire the callbacks as steps commit.

    Raises:
        WorkersGone: from ``fleet.tend``.
    """
    callbacks = list(callbacks)
    seen, next_tend = 0, 0.0
    fire(callbacks, Event.FIT_START, state)
    try:
        while not master.done:
            if time.monotonic() >= next_tend:
                fleet.tend(master)
                next_tend = time.monotonic() + fleet.poll_s
            master.wait(lambda m: m.done or m.committed_count > seen, timeout_s=0.2)
            seen = fire_commits(master, seen, callbacks, state)
    finally:
        fire(callbacks, Event.FIT_END, state)


def fire_commits(master: Master, seen: int, callbacks: Sequence[Callback], state: RunState) -> int:
    """Fire ``on_step_end`` for every step committed since the first ``seen``; return the new count."""
    new, count = master.committed_since(seen)
    for c in new:
        state.step, state.loss, state.step_time_s = c.step + 1, c.loss, c.step_time_s
        fire(list(callbacks), Event.STEP_END, state)
    return count
