"""The master's durable state in its run directory, so a restarted master resumes the job.

``master.json`` (written atomically at every commit) holds the committed step, the membership
epoch counter and the newest checkpoint; ``losses.f64`` is an append-only file of per-step losses
(little-endian float64), truncated to the committed step when read back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Optional


@dataclasses.dataclass
class MasterRecord:
    step: int
    epoch_counter: int
    checkpoint_step: int
    losses: list[float]
    fingerprint: dict[str, str]


class DurableState:
    def __init__(self, run_dir: Path, fingerprint: dict[str, str]):
        self.fingerprint = fingerprint
        self.path = Path(run_dir) / "master.json"
        self.losses_path = Path(run_dir) / "losses.f64"
        self._written_losses = 0

    def load(self) -> Optional[MasterRecord]:
        if not self.path.exists():
            return None
        data = json.loads(self.path.read_text())
        raw = self.losses_path.read_bytes() if self.losses_path.exists() else b""
        n = min(len(raw) // 8, data["step"])
        losses = list(struct.unpack(f"<{n}d", raw[:8 * n]))
        self._written_losses = n
        with open(self.losses_path, "ab") as f:
            f.truncate(8 * n)
        return MasterRecord(data["step"], data["epoch_counter"], data["checkpoint_step"], losses,
                            data.get("fingerprint", {}))

    def save(self, step: int, epoch_counter: int, checkpoint_step: int, losses: list[float]) -> None:
        """Append new losses, then atomically replace ``master.json`` (tmp, fsync, rename)."""
        if len(losses) < self._written_losses:  # rolled back (e.g. to a checkpoint)
            with open(self.losses_path, "ab") as f:
                f.truncate(8 * len(losses))
            self._written_losses = len(losses)
        if len(losses) > self._written_losses:
            with open(self.losses_path, "ab") as f:
                f.write(struct.pack(f"<{len(losses) - self._written_losses}d", *losses[self._written_losses:]))
                f.flush()
                os.fsync(f.fileno())
            self._written_losses = len(losses)
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "epoch_counter": epoch_counter, "checkpoint_step": checkpoint_step,
                       "fingerprint": self.fingerprint}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
