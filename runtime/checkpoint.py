"""Atomic, mapping-independent checkpoints.

A checkpoint holds the job's state, never the workers': whoever wrote it (1 worker or 8), it resumes
on any number. It is written to a temporary name in the same directory, fsynced, renamed over its
final name and the directory fsynced, so a process killed at any instant leaves either the previous
checkpoint or the new one, never half of one. Leftover temporary files are ignored and swept.

A checkpoint is verified before it is read: ``torch.save`` writes a zip archive holding a CRC-32 of
every record (the pickled structure and each tensor's bytes), which ``torch.load`` never checks, so a
flipped byte on disk would load as a wrong weight. ``newest_checkpoint`` checks them all and is the
one place that decides which checkpoint a job resumes from; a damaged one is renamed aside.

A write that fails (a read-only or full directory) raises ``StorageError`` and leaves no temporary
file: the job stops cleanly and resumes from its last checkpoint once the directory is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import CheckpointMismatch, InvalidJobSpec, StorageError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"  # a damaged checkpoint, renamed aside: kept as evidence, never read
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
    grad_scaler: Optional[dict[str, Any]] = None  # precision="fp16": the job's loss scale and its growth tracker
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"step": s, metric: mean, ...}
    scheduler_evaluated: int = -1  # lr_scheduler_metric: the step of the last evaluation the scheduler stepped on
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
        InvalidJobSpec: the parent does not exist, the path is a file, or it cannot be created.
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
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise InvalidJobSpec("checkpoint_dir", f"cannot create {path}: {exc}; make {path.parent} writable "
                             "or choose another path") from exc
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


def save_checkpoint(directory: str | os.PathLike, ckpt: Checkpoint, keep: int = 2,
                    on_staged: Optional[Callable[[], None]] = None) -> Path:
    """Write ``ckpt`` atomically; then drop all but the newest ``keep`` checkpoints. ``on_staged``
    runs once the temporary file is written, before it is renamed into place (``Event.CHECKPOINT_STAGED``).

    Raises:
        StorageError: the directory is read-only, full or gone. The temporary file is removed and
            the previous checkpoints are untouched.
    """
    directory = Path(directory)
    final = checkpoint_path(directory, ckpt.step)
    tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{final.name}"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        if on_staged is not None:
            on_staged()
        os.replace(tmp, final)  # atomic on POSIX: readers see the old name set or the new one
        _fsync_dir(directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # e.g. a read-only directory: it was never created
            tmp.unlink(missing_ok=True)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        raise StorageError.from_os_error(f"checkpoint {final.name}", directory, cause) from exc
    for _, old in list_checkpoints(directory)[:-keep]:
        try:
            old.unlink(missing_ok=True)
        except OSError as exc:  # the new checkpoint is safe: an old one left over is harmless
            log.warning("cannot remove the old checkpoint %s: %s", old, exc)
    return final


def _os_error(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``exc``: ``torch.save`` reports a failed write of its file object as a
    ``RuntimeError`` ("unexpected pos ...") raised while handling the ``OSError`` (ENOSPC, EROFS)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
            try:
                entry.unlink(missing_ok=True)
            except OSError as exc:  # a read-only directory: the next write says so clearly
                log.warning("cannot remove the temporary file %s: %s", entry, exc)


def verify_checkpoint(path: str | os.PathLike) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """``(why the checkpoint file is damaged, None)``, or ``(None, its contents)``.

    ``zipfile`` checks the CRC-32 that ``torch.save`` stored for every record and ``torch.load``
    ignores (a flipped byte in a tensor otherwise loads silently); then the file must load. Both
    belong to one verdict, so that every reader (one process, the master, its workers) agrees on
    which checkpoint is the newest good one.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # noqa: BLE001 - whatever stops the archive from being read is damage
        return f"not a readable checkpoint archive ({type(exc).__name__}: {exc})", None
    if bad is not None:
        return f"record {bad} does not match its CRC-32 checksum", None
    try:
        return None, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an index damaged outside every checksum, a foreign file...
        return f"does not load ({type(exc).__name__}: {exc})", None


def _good_checkpoints(directory: str | os.PathLike) -> Iterator[tuple[int, Path, dict[str, Any]]]:
    """Checkpoints that verify, newest first, with their contents; each damaged one met is renamed
    aside, with a warning."""
    for step, path in reversed(list_checkpoints(directory)):
        problem, data = verify_checkpoint(path)
        if problem is None:
            yield step, path, data
            continue
        aside = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue  # another reader (a peer worker) set it aside and warned first
        except OSError as exc:  # a read-only directory: every reader skips it the same way
            log.warning("checkpoint %s is damaged (%s); skipping it (it could not be renamed aside: %s)",
                        path, problem, exc)
            continue
        log.warning("checkpoint %s is damaged (%s); renamed it to %s and falling back to an older checkpoint",
                    path, problem, aside)


def newest_checkpoint(directory: str | os.PathLike) -> Optional[tuple[int, Path]]:
    """``(step, path)`` of the newest checkpoint in ``directory`` that verifies, or ``None``.

    The one place that decides where a job resumes: ``train``, the master (at start and when it
    rolls back to disk) and the workers that load the checkpoint all ask here, so they agree. A
    damaged checkpoint is renamed to ``step-XXXXXXXX.pt.corrupt`` so that every later reader skips
    it too, and the evidence is kept.
    """
    found = next(_good_checkpoints(directory), None)
    return None if found is None else found[:2]


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Checkpoint]:
    """The newest checkpoint in ``directory`` that verifies (see ``newest_checkpoint``), or ``None``."""
    found = next(_good_checkpoints(directory), None)
    return None if found is None else Checkpoint.from_dict(found[2])


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """The latest checkpoint in ``directory`` as a dict (``ckpt["model"]`` is the model state dict).

    Raises:
        FileNotFoundError: no complete checkpoint in ``directory``.
    """
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint (step-*.pt) in {directory}")
    return ckpt.to_dict()
