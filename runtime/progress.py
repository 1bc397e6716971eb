"""A live progress display: step, loss, the latest evaluation, samples/s and ETA (rich, on standard error)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .events import Callback, RunState


class ProgressDisplay(Callback):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        self._t0 = 0.0

    def on_fit_start(self, state: RunState) -> None:
        self._progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[evaluation]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=state.steps, completed=state.start_step,
                                             loss="-", rate="-", evaluation="")
        self._t0 = time.perf_counter()

    def on_step_end(self, state: RunState) -> None:
        if self._progress is None:
            return
        done = state.step - state.start_step
        elapsed = time.perf_counter() - self._t0
        rate = done * state.samples_per_step / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=state.step, loss=f"{state.loss:.4f}", rate=f"{rate:,.0f}")

    def on_evaluated(self, state: RunState) -> None:
        if self._progress is None or not state.evaluation:
            return
        shown = ", ".join(f"{name} {value:.4g}" for name, value in list(state.evaluation.items())[:3])
        self._progress.update(self._task, evaluation=f"eval@{state.evaluation_step}: {shown}")

    def on_fit_end(self, state: RunState) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
