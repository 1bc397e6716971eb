"""Events of a training run, and the callbacks that observe them.

The training loop, in the pseudocode whose points the events name::

    on_fit_start                       # engine built, checkpoint (if any) loaded
    for step in range(start, steps):
        for v in my virtual nodes: forward, backward
        reduce; commit; optimizer.step()
        on_step_end                    # the step is applied everywhere
        if due: save checkpoint
            on_checkpoint
    on_fit_end

Callbacks are observers: they never change training.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Optional


class Event(str, Enum):
    FIT_START = "fit_start"
    STEP_END = "step_end"
    CHECKPOINT = "checkpoint"
    FIT_END = "fit_end"


@dataclasses.dataclass
class RunState:
    """What observers see. ``step`` counts applied steps."""

    step: int
    steps: int
    start_step: int
    samples_per_step: int
    loss: Optional[float] = None
    step_time_s: float = 0.0
    checkpoint_path: Optional[str] = None


class Callback:
    """Override the ``on_<event>`` methods you need."""

    def on_fit_start(self, state: RunState) -> None: ...

    def on_step_end(self, state: RunState) -> None: ...

    def on_checkpoint(self, state: RunState) -> None: ...

    def on_fit_end(self, state: RunState) -> None: ...


def fire(callbacks: list[Callback], event: Event, state: RunState) -> None:
    for callback in callbacks:
        getattr(callback, f"on_{event.value}")(state)
