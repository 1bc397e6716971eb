"""Atomic, mapping-independent checkpoints.

A checkpoint holds the job's state, never the workers': whoever wrote it (1 worker or 8), it resumes
on any number. It is written to a temporary name in the same directory, fsynced, renamed over its
final name and the directory fsynced, so a process killed at any instant leaves either the previous
checkpoint or the new one, never half of one. Leftover temporary files are ignored and swept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CheckpointMismatch, InvalidJobSpec
from .faults import maybe_fail

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Checkpoint:
    """Everything a job needs to continue on the same trajectory, on any number of workers."""

    step: int  # steps applied so far: the next step to run
    epoch: int  # data epoch of ``step`` (derived, stored for readers)
    model: dict[str, Any]
    optimizer: dict[str, Any]
    lr_scheduler: Optional[dict[str, Any]]
    fingerprint: dict[str, str]  # JobSpec.fingerprint() of the job that wrote it
    losses: list[float]  # per-step mean training loss, steps [0, step)
    sampler: dict[str, int]  # {"steps_per_epoch", "position"}: position == step
    vnodes: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per virtual node
    plugins: dict[str, Any] = dataclasses.field(default_factory=dict)
    membership_epoch: int = 0
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Checkpoint":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def check_fingerprint(self, fingerprint: dict[str, str], directory: str) -> None:
        """Raises ``CheckpointMismatch`` naming every trajectory field that differs."""
        differ = sorted(k for k in set(fingerprint) | set(self.fingerprint)
                        if fingerprint.get(k) != self.fingerprint.get(k))
        if differ:
            raise CheckpointMismatch(differ, directory)


def check_checkpoint_dir(path: Optional[str | os.PathLike]) -> Optional[Path]:
    """Validate (and create) a checkpoint directory before any training.

    Raises:
        InvalidJobSpec: the parent does not exist, or the path is a file.
    """
    if path is None:
        return None
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise InvalidJobSpec("checkpoint_dir", f"{path} exists and is not a directory; pass a directory")
    if not path.parent.is_dir():
        raise InvalidJobSpec(
            "checkpoint_dir",
            f"the parent of {path} ({path.parent}) does not exist; create it first or choose another path",
        )
    path.mkdir(exist_ok=True)
    return path


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically; then drop all but the newest ``keep`` checkpoints."""
    directory = Path(directory)
    final = checkpoint_path(directory, ckpt.step)
    tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{final.name}"
    with open(tmp, "wb") as f:
        torch.save(ckpt.to_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    maybe_fail("checkpoint_write", ckpt.step - 1)  # the phase of the step just applied
    os.replace(tmp, final)  # atomic on POSIX: readers see the old name set or the new one
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temporaries(directory: Path) -> None:
    """Remove temporary files a killed writer left behind (they are never read)."""
    for entry in directory.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            entry.unlink(missing_ok=True)


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Checkpoint]:
    """The newest readable checkpoint in ``directory``, or ``None`` if there is none.

    A checkpoint that fails to load (a damaged disk; never a killed writer) is skipped with a
    warning and the one before it is used.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file falls back to the previous one
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        return Checkpoint.from_dict(data)
    return None


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """The latest checkpoint in ``directory`` as a dict (``ckpt["model"]`` is the model state dict).

    Raises:
        FileNotFoundError: no complete checkpoint in ``directory``.
    """
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint (step-*.pt) in {directory}")
    return ckpt.to_dict()
