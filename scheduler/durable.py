"""The master's durable state in its run directory, so a restarted master resumes the job.

``master.json`` (written atomically at every commit) holds the committed step, the membership
epoch counter, the newest checkpoint and the roster: the ids of the workers that may still be running
the job, and which of them were told STOP (rewritten as each one is told, and leaves, at the end), so
that a restarted master waits for them to reconnect and tells them the job's end; ``losses.f64`` is
an append-only file of per-step losses (little-endian float64), truncated to the committed step when
read back.

A write that fails (a read-only or full run directory) raises ``StorageError``: the master fails the
job cleanly (``Master._persist``) rather than go on with state it cannot keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

from vnodes.runtime.errors import StorageError


@dataclasses.dataclass
class MasterRecord:
    step: int
    epoch_counter: int
    checkpoint_step: int
    losses: list[float]
    fingerprint: dict[str, str]
    workers: Optional[list[str]] = None  # the roster; None: not recorded (an older version wrote the file)
    told: list[str] = dataclasses.field(default_factory=list)  # those of the roster told STOP
    evaluations: list[dict] = dataclasses.field(default_factory=list)  # the job's evaluations so far


class DurableState:
    def __init__(self, run_dir: Path, fingerprint: dict[str, str]):
        self.fingerprint = fingerprint
        self.path = Path(run_dir) / "master.json"
        self.losses_path = Path(run_dir) / "losses.f64"
        self._written_losses = 0

    def load(self) -> Optional[MasterRecord]:
        """The recorded state, or ``None`` if this run directory has none.

        Raises:
            StorageError: ``losses.f64`` cannot be truncated to the committed step (read-only directory).
        """
        if not self.path.exists():
            return None
        data = json.loads(self.path.read_text())
        raw = self.losses_path.read_bytes() if self.losses_path.exists() else b""
        n = min(len(raw) // 8, data["step"])
        losses = list(struct.unpack(f"<{n}d", raw[:8 * n]))
        self._written_losses = n
        try:
            with open(self.losses_path, "ab") as f:
                f.truncate(8 * n)
        except OSError as exc:
            raise StorageError.from_os_error(f"the master's state ({self.losses_path.name})", self.path.parent,
                                             exc) from exc
        workers, told = data.get("workers"), data.get("told")
        roster = [str(w) for w in workers] if isinstance(workers, list) else None
        told = [str(w) for w in told] if isinstance(told, list) else []
        evaluations = [e for e in data.get("evaluations", []) if isinstance(e, dict) and "step" in e]
        return MasterRecord(data["step"], data["epoch_counter"], data["checkpoint_step"], losses,
                            data.get("fingerprint", {}), roster, told, evaluations)

    def save(self, step: int, epoch_counter: int, checkpoint_step: int, losses: list[float],
             workers: Sequence[str] = (), told: Sequence[str] = (), evaluations: Sequence[dict] = ()) -> None:
        """Append new losses, then atomically replace ``master.json`` (tmp, fsync, rename).

        Raises:
            StorageError: a write failed; no temporary file is left and ``master.json`` is the old one.
        """
        tmp = self.path.with_suffix(".json.tmp")
        try:
            self._save(tmp, step, epoch_counter, checkpoint_step, losses, workers, told, evaluations)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError.from_os_error(f"the master's state ({self.path.name}, {self.losses_path.name})",
                                             self.path.parent, exc) from exc

    def _save(self, tmp: Path, step: int, epoch_counter: int, checkpoint_step: int, losses: list[float],
              workers: Sequence[str], told: Sequence[str], evaluations: Sequence[dict] = ()) -> None:
        if len(losses) < self._written_losses:  # rolled back (e.g. to a checkpoint)
            with open(self.losses_path, "ab") as f:
                f.truncate(8 * len(losses))
            self._written_losses = len(losses)
        if len(losses) > self._written_losses:
            try:
                with open(self.losses_path, "ab") as f:
                    f.write(struct.pack(f"<{len(losses) - self._written_losses}d", *losses[self._written_losses:]))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:  # a full disk may have taken part of a record: the next append must start aligned
                with contextlib.suppress(OSError):
                    os.truncate(self.losses_path, 8 * self._written_losses)
                raise
            self._written_losses = len(losses)
        with open(tmp, "w") as f:
            json.dump({"step": step, "epoch_counter": epoch_counter, "checkpoint_step": checkpoint_step,
                       "fingerprint": self.fingerprint, "workers": list(workers), "told": list(told),
                       "evaluations": list(evaluations)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


OUTCOME_FILE = "outcome.json"


def write_outcome(run_dir: Path, state: str, step: int, message: str = "", error_type: str = "") -> None:
    """Record how the job ended (``state``: ``done`` or ``failed``) as ``RUN_DIR/outcome.json``,
    atomically, for whoever started the master (``vnodes cluster`` reads it). Best effort: a run
    directory that cannot be written already failed the job with its own message."""
    path = Path(run_dir) / OUTCOME_FILE
    tmp = path.with_suffix(".json.tmp")
    with contextlib.suppress(OSError):
        with open(tmp, "w") as f:
            json.dump({"state": state, "step": step, "message": message, "error_type": error_type}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def read_outcome(run_dir: Path) -> Optional[dict]:
    """The outcome ``write_outcome`` recorded, or None (none yet, or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("state") in ("done", "failed") else None


def clear_outcome(run_dir: Path) -> None:
    """Forget a previous run's outcome (a job resumed to train longer)."""
    with contextlib.suppress(OSError):
        (Path(run_dir) / OUTCOME_FILE).unlink(missing_ok=True)
