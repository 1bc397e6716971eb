"""Deterministic fault injection for tests: SIGKILL (or hang, stop, raise in) this process at a chosen
event of a chosen step.

Set ``VNODES_FAULT="event:step"`` in a process's environment, the event being a worker ``Event``
value (``events.WORKER_EVENTS``: ``batch_loaded``, ``loss_computed``, ``backward_done``, ``reduce``,
``reduced``, ``checkpoint_staged``...); several faults are separated by commas.
``event:step:index`` targets the worker whose ``VNODES_LAUNCH_INDEX`` is ``index``, and a trailing
``:hang`` makes the main thread block forever instead of dying (its other threads, such as
heartbeats, go on: a hung worker), and ``:stop`` SIGSTOPs the whole process (a frozen machine: its
sockets stay open, nothing answers); ``:raise`` raises a ``RuntimeError`` at that event at every
attempt of the step (a deterministic bug: at ``reduce``, it fails the job at once), and ``:lose`` a
``PeerLost`` (a peer lost at every attempt: retried up to ``VNODES_MAX_STEP_ATTEMPTS``). A
checkpoint's events count as those of the step just applied
(``step - 1`` of the checkpoint). Unset (the normal case), nothing subscribes: it costs nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

from .errors import PeerLost
from .events import WORKER_EVENTS, Event

PHASES = tuple(e.value for e in WORKER_EVENTS)
ACTIONS = ("kill", "hang", "stop", "raise", "lose")


def _parse(text: str) -> dict[tuple[Event, int, Optional[int]], str]:
    faults = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        action = parts.pop() if parts[-1] in ACTIONS else "kill"
        if len(parts) not in (2, 3) or parts[0] not in PHASES:
            raise ValueError(f"VNODES_FAULT item {item!r}: expected event:step[:worker][:{'|'.join(ACTIONS)}] "
                             f"with event in {PHASES}")
        faults[(Event(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None)] = action
    return faults


class FaultInjector:
    """Subscribes to a worker's events; acts when an armed ``(event, step[, index])`` comes."""

    def __init__(self, faults: dict[tuple[Event, int, Optional[int]], str], index: int):
        self.faults, self.index = faults, index

    @classmethod
    def from_env(cls) -> Optional["FaultInjector"]:
        """The faults armed in ``VNODES_FAULT`` (None: none)."""
        faults = _parse(os.environ.get("VNODES_FAULT", ""))
        return cls(faults, int(os.environ.get("VNODES_LAUNCH_INDEX", "-1"))) if faults else None

    def __call__(self, event: Event, step: int, work: int = 1) -> None:
        action = self.faults.get((event, step, None)) or self.faults.get((event, step, self.index))
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            threading.Event().wait()
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "raise":  # at every attempt of the step: a deterministic bug
            raise RuntimeError(f"VNODES_FAULT: injected failure at {event.value} of step {step}")
        elif action == "lose":  # at every attempt of the step: a peer lost each time (retryable)
            raise PeerLost(f"VNODES_FAULT: injected peer loss at {event.value} of step {step}")
