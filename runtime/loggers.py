"""Loggers: callbacks that send each committed step's metrics somewhere.

    train(spec, steps, callbacks=[TensorBoardLogger("runs/tb"), CSVLogger("metrics.csv")])
    vnodes run job.py --steps 1000 --run-dir run --log tensorboard     # RUN_DIR/tensorboard/

They run where the driver runs (the process that called ``train`` or ``vnodes run``), which hears
every step once from the master, however many workers there are: nothing is logged twice. What
they log is ``RunState`` at each step: loss, learning rate, gradient norm (before clipping), samples
per second, the spread of the virtual nodes' losses, and whether an fp16 overflow skipped the step.
The master also writes all of it, with membership changes and aborted steps, to
``RUN_DIR/metrics.jsonl`` (``vnodes.scheduler.metrics_stream``).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional

from .errors import VnodesError
from .events import Callback, RunState

LOGGERS = ("tensorboard", "csv", "mlflow")


def step_metrics(state: RunState) -> dict[str, float]:
    """The numbers of one step, by name (those not known are left out)."""
    values = {"loss": state.loss, "lr": state.lr, "grad_norm": state.grad_norm,
              "samples_per_s": state.samples_per_s, "loss_spread": state.loss_spread,
              "step_time_s": state.step_time_s, "skipped": float(state.skipped)}
    values.update({name: value for name, value in state.metrics.items() if name not in values})
    return {k: float(v) for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


class TensorBoardLogger(Callback):
    """Scalars under ``train/`` in a TensorBoard event file in ``log_dir`` (needs ``tensorboard``)."""

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise VnodesError("TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                              "(or 'vnodes[logging]')") from None
        self.log_dir = str(log_dir)
        self._writer_class = SummaryWriter
        self.writer = None

    def on_fit_start(self, state: RunState) -> None:
        self.writer = self._writer_class(self.log_dir)

    def on_step_end(self, state: RunState) -> None:
        if self.writer is None:
            self.on_fit_start(state)
        for name, value in step_metrics(state).items():
            self.writer.add_scalar(f"train/{name}", value, state.step)

    def on_evaluated(self, state: RunState) -> None:
        if self.writer is None:
            self.on_fit_start(state)
        for name, value in (state.evaluation or {}).items():
            self.writer.add_scalar(f"eval/{name}", value, state.evaluation_step)

    def on_fit_end(self, state: RunState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CSVLogger(Callback):
    """One row per step in ``path``: ``FIELDS``, then ``step_fn``'s metrics by name (appended to,
    with a header when the file is new; an existing file keeps its columns)."""

    FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "loss_spread", "step_time_s", "skipped")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self._writer = None

    def _open(self, state: RunState) -> None:
        """At the first step, when the metrics' names are known."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fields = list(self.FIELDS) + sorted(name for name in state.metrics if name not in self.FIELDS)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with open(self.path, newline="") as existing:
                fields = next(csv.reader(existing), None) or fields
        self._file = open(self.path, "a", newline="", buffering=1)
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        if new:
            self._writer.writeheader()

    def on_step_end(self, state: RunState) -> None:
        if self._writer is None:
            self._open(state)
        self._writer.writerow({"step": state.step, **step_metrics(state)})

    def on_fit_end(self, state: RunState) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


class MLflowLogger(Callback):
    """Metrics to the active MLflow run (or one it starts), when ``mlflow`` is installed."""

    def __init__(self, run_name: Optional[str] = None):
        try:
            import mlflow
        except ImportError:
            raise VnodesError("MLflowLogger needs the mlflow package: pip install mlflow") from None
        self.mlflow, self.run_name = mlflow, run_name
        self._started = False

    def on_fit_start(self, state: RunState) -> None:
        if self.mlflow.active_run() is None:
            self.mlflow.start_run(run_name=self.run_name)
            self._started = True

    def on_step_end(self, state: RunState) -> None:
        self.mlflow.log_metrics(step_metrics(state), step=state.step)

    def on_evaluated(self, state: RunState) -> None:
        self.mlflow.log_metrics({f"eval_{k}": v for k, v in (state.evaluation or {}).items()}, step=state.evaluation_step)

    def on_fit_end(self, state: RunState) -> None:
        if self._started:
            self.mlflow.end_run()
            self._started = False


def logger_named(name: str, run_dir: Optional[str]) -> Callback:
    """``vnodes run --log NAME``: tensorboard in ``RUN_DIR/tensorboard``, csv in ``RUN_DIR/metrics.csv``.

    Raises:
        VnodesError: an unknown name, no run directory for a file logger, or the package missing.
    """
    if name not in LOGGERS:
        raise VnodesError(f"--log {name!r} is not a logger; choose {', '.join(LOGGERS)}")
    if name == "mlflow":
        return MLflowLogger()
    if run_dir is None:
        raise VnodesError(f"--log {name} writes into the run directory; pass --run-dir D")
    return TensorBoardLogger(Path(run_dir) / "tensorboard") if name == "tensorboard" else \
        CSVLogger(Path(run_dir) / "metrics.csv")
