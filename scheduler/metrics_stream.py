"""The job's metrics stream: ``RUN_DIR/metrics.jsonl``, one JSON object per line, written by the
master (the one place that sees every step, so nothing is written twice however many workers run).

Rows, in the order things happen::

    {"step": 12, "loss": 0.41, "lr": 0.001, "grad_norm": 0.83, "skipped": false,
     "samples_per_s": 5120.4, "step_time_s": 0.05, "loss_spread": 0.07, "workers": 3,
     "membership_epoch": 2, "time": 1796300000.1}
    {"event": "membership", "step": 40, "membership_epoch": 3, "workers": 2, "vnodes": [8, 8]}
    {"event": "aborted", "step": 41, "membership_epoch": 3, "reason": "worker w-2 lost: ..."}
    {"event": "evaluation", "step": 50, "samples": 10000, "metrics": {"step": 50, "loss": 0.38, ...}}

``step`` counts from 1 (the number of steps applied, as ``RunState.step``); ``loss_spread`` is the
standard deviation of the virtual nodes' mean losses; ``grad_norm`` is the reduced gradient's
2-norm before clipping (``null`` where a worker did not report it; ``Infinity`` or ``NaN`` on an
fp16 overflow, with ``skipped: true``). ``samples_per_s`` is the global batch over the time
between two commits. A job resumed from a checkpoint drops the rows past it: the stream holds one
row per applied step. Lines are flushed as they are written (not fsynced).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsStream:
    def __init__(self, run_dir: Path, start_step: int, samples_per_step: int, evaluated: Sequence[int] = ()):
        """Open ``run_dir/metrics.jsonl`` for appending, keeping only what precedes ``start_step``
        (the step the job resumes at; of the evaluations there, those in ``evaluated``, which the
        job keeps). A stream that cannot be written is logged once and skipped: metrics never stop
        a job."""
        self.path = Path(run_dir) / METRICS_FILE
        self.samples_per_step = samples_per_step
        self._last_commit_s: Optional[float] = None
        self._file = None
        self._broken = False
        try:
            self._truncate_after(start_step, evaluated)
        except OSError as exc:
            self._stop(exc)

    def _truncate_after(self, start_step: int, evaluated: Sequence[int] = ()) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            step, event = row.get("step", 0), row.get("event")
            # a step row counts applied steps; an evaluation is of the weights at its step (kept at
            # the resume point if the job keeps it, else it is redone); other events happen before
            # their step (redone from it)
            if event is None:
                keep = step <= start_step
            elif event == "evaluation":
                keep = step < start_step or step in evaluated
            else:
                keep = step < start_step
            if keep:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def rewind(self, step: int, evaluated: Sequence[int] = ()) -> None:
        """The job went back to ``step`` (a checkpoint): drop the rows past it."""
        if self._broken:
            return
        self.close()
        try:
            self._truncate_after(step, evaluated)
        except OSError as exc:
            self._stop(exc)
        self._last_commit_s = None

    def step(self, step: int, loss: float, vnode_losses: Sequence[float], step_time_s: float, workers: int,
             membership_epoch: int, grad_norm: float, skipped: bool, lr: float, committed_at_s: float,
             metrics: Optional[dict[str, float]] = None) -> None:
        """A committed step (``step``: its 0-based index; ``metrics``: ``step_fn``'s, if it returns some)."""
        elapsed = committed_at_s - self._last_commit_s if self._last_commit_s is not None else step_time_s
        self._last_commit_s = committed_at_s
        self._write({"step": step + 1, "loss": loss, "lr": _number(lr), "grad_norm": _number(grad_norm),
                     "skipped": skipped,
                     "samples_per_s": round(self.samples_per_step / elapsed, 3) if elapsed > 0 else None,
                     "step_time_s": round(step_time_s, 6),
                     "loss_spread": statistics.pstdev(vnode_losses) if len(vnode_losses) > 1 else 0.0,
                     "workers": workers, "membership_epoch": membership_epoch,
                     **({"metrics": {k: _number(v) for k, v in metrics.items()}} if metrics else {}),
                     "time": round(time.time(), 3)})

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """A membership change or an aborted step (``step``: the step it concerns, 0-based)."""
        self._write({"event": kind, "step": step, **fields, "time": round(time.time(), 3)})

    def _write(self, row: dict) -> None:
        if self._broken:
            return
        created = False
        try:
            if self._file is None:  # opened at the first row: a job that fails first leaves no file
                created = not self.path.exists()
                self._file = open(self.path, "a", buffering=1)
            self._file.write(json.dumps(row) + "\n")
        except OSError as exc:
            self.close()
            if created:  # e.g. a full disk: leave nothing behind
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._stop(exc)

    def _stop(self, exc: OSError) -> None:
        log.warning("no metrics stream: cannot write %s (%s); training goes on", self.path, exc.strerror)
        self._broken = True

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _number(value: float) -> Optional[float]:
    """A float for JSON: None where it was not reported (NaN), else as is (inf and NaN of an
    overflow are written as JSON's Infinity / NaN by ``json.dumps``)."""
    return value if value is None or not math.isnan(value) else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every row of ``RUN_DIR/metrics.jsonl`` (a line cut short by a kill is skipped)."""
    rows = []
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows
