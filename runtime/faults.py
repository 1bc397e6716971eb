"""Deterministic fault injection for tests: SIGKILL (or hang) this process at a chosen phase of a step.

Set ``VNODES_FAULT="phase:step"`` in a process's environment; several faults are separated by
commas. ``phase:step:index`` targets the worker whose ``VNODES_LAUNCH_INDEX`` is ``index``, and a
trailing ``:hang`` makes the main thread block forever instead of dying (its other threads, such as
heartbeats, go on: a hung worker), and ``:stop`` SIGSTOPs the whole process (a frozen machine: its
sockets stay open, nothing answers). Phases, in step order: ``load``, ``forward``, ``backward``,
``reduce``, ``commit``, ``checkpoint_write`` (after the temporary file is written, before the
rename). Unset (the normal case) costs one dictionary lookup per phase.
"""

from __future__ import annotations

import os
import signal
import threading

from .lifecycle import FAULT_PHASES, WorkerPhase

PHASES = tuple(p.value for p in FAULT_PHASES)


def _parse(text: str) -> dict[tuple[WorkerPhase, int, int | None], str]:
    faults = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        action = parts.pop() if parts[-1] in ("kill", "hang", "stop") else "kill"
        if len(parts) not in (2, 3) or parts[0] not in PHASES:
            raise ValueError(f"VNODES_FAULT item {item!r}: expected phase:step[:worker][:kill|hang|stop] "
                             f"with phase in {PHASES}")
        faults[(WorkerPhase(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None)] = action
    return faults


_FAULTS = _parse(os.environ.get("VNODES_FAULT", ""))
_INDEX = int(os.environ.get("VNODES_LAUNCH_INDEX", "-1"))


def maybe_fail(phase: WorkerPhase, step: int) -> None:
    """SIGKILL this process (or block this thread forever) if a fault is armed for ``(phase, step)``."""
    if not _FAULTS:
        return
    action = _FAULTS.get((phase, step, None)) or _FAULTS.get((phase, step, _INDEX))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        threading.Event().wait()
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
