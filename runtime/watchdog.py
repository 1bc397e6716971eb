"""Self-fencing of a hung worker.

Heartbeats come from a background thread, so on their own they prove that the process lives, not
that it works: a main thread stuck in a deadlocked data loader or a wedged driver call would keep
heartbeating while every peer waits for it in the all-reduce. The agent therefore tells the
watchdog the events of its loop (``events.Event``), and each event says whether what follows is
a wait or local work (``Event.waits``). Waiting on peers or on the master (plan, rendezvous,
reduce, commit) may take as long as they need; a *local* phase (compute, apply, checkpoint write)
that makes no progress for ``timeout_s`` means the worker is hung. The watchdog then dumps every
thread's stack to stderr and ends the process with ``EXIT_HUNG``. Its session stream and its
sockets close, so the master declares it lost at once and the survivors' collective fails instead of
waiting: they redo the step without it, exactly as after a crash.

The timeout adapts: a phase may take ``slack`` times its longest completed run, so a job whose
steps legitimately take long never fences itself; a phase is not judged before it has completed
once.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

from .errors import VnodesError
from .events import Event

log = logging.getLogger(__name__)

EXIT_HUNG = 3
DEFAULT_HANG_TIMEOUT_S = 300.0


class Watchdog:
    """Tracks the main thread's phase; fences the process when a local phase outlives its budget.

    A local phase is judged only once it has completed before: its budget is
    ``max(timeout_s, slack * its slowest completed run per unit of work * this run's work)``, the
    work being e.g. the virtual nodes a compute phase runs (a worker that takes over its peers'
    nodes gets a budget to match). So the first step (compilation,
    autotuning, warm-up) and the first checkpoint write are never fenced, and neither is building
    the job (``build``: a dataset may take long to prepare), which counts as waiting.
    """

    def __init__(self, timeout_s: float, slack: float = 10.0, poll_s: float = 0.5,
                 on_hang: Optional[Callable[[str, float], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        if timeout_s <= 0:
            raise ValueError(f"hang timeout {timeout_s} s must be > 0 (leave the watchdog off instead)")
        self.timeout_s = timeout_s
        self.slack = slack
        self.poll_s = poll_s
        self.clock = clock
        self.on_hang = on_hang or _fence
        self._current = (Event.FIT_START, clock(), 1)  # (phase, since, work): one attribute, read and written whole
        self._longest_s: dict[str, float] = {}  # local phase -> its slowest completed run, per unit of work
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __call__(self, event: Event, step: int = -1, work: int = 1) -> None:
        """A worker event (the watchdog subscribes to the loop's events): one that starts a wait or
        a local stretch of work starts a new phase; a point inside one (``Event.waits`` None) does not."""
        if event.waits is not None:
            self.enter(event, work)

    def enter(self, phase: Event, work: int = 1) -> None:
        """The main thread starts ``phase`` of ``work`` units (cheap: a clock read, a few assignments)."""
        now = self.clock()
        previous, since, previous_work = self._current
        if not previous.waits:
            per_unit = (now - since) / max(1, previous_work)
            self._longest_s[previous] = max(self._longest_s.get(previous, 0.0), per_unit)
        self._current = (phase, now, work)

    def budget_s(self, phase: Event, work: int = 1) -> Optional[float]:
        """Seconds ``phase`` of ``work`` units may run before the worker counts as hung; None: not
        judged (yet)."""
        if phase.waits or phase not in self._longest_s:
            return None
        return max(self.timeout_s, self.slack * self._longest_s[phase] * max(1, work))

    def check(self) -> bool:
        """Fence (``on_hang``) if the current local phase is over budget; True if it fired."""
        phase, since, work = self._current
        budget, stuck_s = self.budget_s(phase, work), self.clock() - since
        if budget is None or stuck_s <= budget:
            return False
        self.on_hang(phase, stuck_s)
        return True

    def start(self) -> "Watchdog":
        def run():
            while not self._stop.wait(self.poll_s):
                if self.check():
                    return

        self._thread = threading.Thread(target=run, name="vnodes-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


def hang_timeout_from_env() -> Optional[float]:
    """``VNODES_HANG_TIMEOUT`` seconds (0: no watchdog), else ``DEFAULT_HANG_TIMEOUT_S``."""
    text = os.environ.get("VNODES_HANG_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_HANG_TIMEOUT_S
    except ValueError:
        raise VnodesError(f"VNODES_HANG_TIMEOUT={text!r} is not a number of seconds (0 turns the watchdog off)") from None
    if value < 0:
        raise VnodesError(f"VNODES_HANG_TIMEOUT={text!r} is negative; use 0 to turn the watchdog off")
    return value or None


def _fence(phase: Event, stuck_s: float) -> None:
    print(f"vnodes worker {os.getpid()}: hung after event {phase.value!r} for {stuck_s:.1f} s; dumping stacks "
          f"and exiting with code {EXIT_HUNG} so that the job goes on without this worker", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_HUNG)
