"""Deterministic fault injection for tests: SIGKILL this process at a chosen phase of a chosen step.

Set ``VNODES_FAULT="phase:step"`` (several separated by commas; ``phase:step:index`` to target the
worker whose ``VNODES_LAUNCH_INDEX`` is ``index``) in a process's environment. Phases, in step order: ``load``, ``forward``, ``backward``,
``reduce``, ``commit``, ``checkpoint_write`` (after the temporary file is written, before the rename).
Unset (the normal case) costs one dictionary lookup per phase.
"""

from __future__ import annotations

import os
import signal

PHASES = ("load", "forward", "backward", "reduce", "commit", "checkpoint_write")


def _parse(text: str) -> set[tuple[str, int, int | None]]:
    faults = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in PHASES:
            raise ValueError(f"VNODES_FAULT item {item!r}: expected phase:step[:worker] with phase in {PHASES}")
        faults.add((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return faults


_FAULTS = _parse(os.environ.get("VNODES_FAULT", ""))
_INDEX = int(os.environ.get("VNODES_LAUNCH_INDEX", "-1"))


def maybe_fail(phase: str, step: int) -> None:
    """SIGKILL this process if a fault is armed for ``(phase, step)`` here."""
    if _FAULTS and ((phase, step, None) in _FAULTS or (phase, step, _INDEX) in _FAULTS):
        os.kill(os.getpid(), signal.SIGKILL)
