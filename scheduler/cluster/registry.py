"""The cluster service's durable state: every job it was given and every worker it started.

Everything lives under the service's state directory (``vnodes cluster --run-dir D``):

    D/cluster.json        the registry below, replaced atomically (tmp, fsync, rename) at every change
    D/lock                held (flock) by the one service that owns D
    D/token               the token the jobs' masters and workers share (mode 0600)
    D/jobs/ID/code/       the job's folder as it was submitted (what its master and workers run)
    D/jobs/ID/master.log  its master's output; worker-SLOT.log: each of its workers'

A service SIGKILLed at any instant leaves the previous registry or the new one. Its children (job
masters, workers) live on: they are recorded with their pid and start time (so a reused pid is
never taken for them), and a restarted service adopts them (``service.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Optional

from vnodes.runtime.errors import VnodesError

REGISTRY_VERSION = 1


class ClusterJobState(str, enum.Enum):
    """A submitted job's lifecycle, as ``vnodes jobs`` shows it::

        QUEUED --(the policy gives it workers)--> RUNNING --(its master ends the job)--> DONE | FAILED
           ^                                        |
           +--------(the policy takes them all)-----+
        QUEUED | RUNNING --(vnodes cancel)--> CANCELLED

    DONE, FAILED and CANCELLED are final. A preempted job is QUEUED again, its master kept.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (ClusterJobState.DONE, ClusterJobState.FAILED, ClusterJobState.CANCELLED)


@dataclasses.dataclass
class ProcessRecord:
    """A process the service started: ``pid`` and its start time (``psutil``), to tell it from a
    later process that reuses the pid."""

    pid: int
    create_time: float


@dataclasses.dataclass
class JobRecord:
    id: str
    name: str
    job: str  # the job file inside the job's code folder, with :NAME if any
    steps: int
    priority: int
    run_dir: str
    deterministic: bool
    overrides: list[str]
    virtual_nodes: int
    requested_workers: int
    checkpoint_every: int
    submitted_at: float  # Unix time
    state: ClusterJobState = ClusterJobState.QUEUED
    message: str = ""
    step: int = 0
    port: int = 0  # its master's, fixed at first start: workers reconnect there to a restarted master
    master: Optional[ProcessRecord] = None
    master_starts: int = 0
    attained_worker_s: float = 0.0  # worker-seconds held so far (least-attained-service policies)
    resizes: int = 0
    rates: dict[str, float] = dataclasses.field(default_factory=dict)  # workers -> measured steps/s
    cancel_requested: bool = False
    finished_at: Optional[float] = None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_json(cls, data: dict) -> "JobRecord":
        data = dict(data)
        data["state"] = ClusterJobState(data["state"])
        data["master"] = ProcessRecord(**data["master"]) if data.get("master") else None
        return cls(**data)


@dataclasses.dataclass
class SlotRecord:
    """One worker of the pool, and the job it works for. ``draining``: told to leave at the next
    step boundary (SIGTERM); the slot is free once the process has exited."""

    slot: int
    job_id: str
    process: Optional[ProcessRecord]  # None: a Ray actor (it does not outlive its service)
    draining: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SlotRecord":
        data = dict(data)
        data["process"] = ProcessRecord(**data["process"]) if data.get("process") else None
        return cls(**data)


@dataclasses.dataclass
class Registry:
    jobs: list[JobRecord] = dataclasses.field(default_factory=list)  # in submission order
    slots: list[SlotRecord] = dataclasses.field(default_factory=list)
    next_id: int = 1
    policy_state: dict = dataclasses.field(default_factory=dict)
    started_at: float = 0.0  # the service's first start (arrival times count from here)

    def job(self, job_id: str) -> JobRecord:
        """Raises ``KeyError`` if no job has that id."""
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise KeyError(job_id)


class StateDirInUse(VnodesError):
    def __init__(self, state_dir: str):
        super().__init__(state_dir)
        self.state_dir = state_dir

    def __str__(self) -> str:
        return (f"another vnodes cluster service runs on {self.state_dir} (it holds {self.state_dir}/lock); "
                "stop it first, or pass another --run-dir")


class StateDir:
    """The service's directory (module docstring): its lock, token, registry and per-job folders."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()
        self.registry_path = self.path / "cluster.json"
        self._lock_file = None

    def open(self) -> None:
        """Create the directory if needed and take its lock.

        Raises:
            StateDirInUse: another live service holds it.
            VnodesError: it cannot be created or written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path / "lock", "a+")
        except OSError as exc:
            raise VnodesError(f"cannot use {self.path} as the service's --run-dir: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StateDirInUse(str(self.path)) from None

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    def token(self) -> str:
        """The jobs' shared token, made on first use and kept (a restarted service's masters and
        workers must go on accepting each other)."""
        path = self.path / "token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    def job_dir(self, job_id: str) -> Path:
        return self.path / "jobs" / job_id

    def load(self) -> Registry:
        """The recorded registry, or an empty one.

        Raises:
            VnodesError: the file is not a registry this version reads.
        """
        if not self.registry_path.exists():
            return Registry()
        try:
            data = json.loads(self.registry_path.read_text())
            if data.get("version") != REGISTRY_VERSION:
                raise ValueError(f"version {data.get('version')!r}, this vnodes reads {REGISTRY_VERSION}")
            return Registry(jobs=[JobRecord.from_json(j) for j in data["jobs"]],
                            slots=[SlotRecord.from_json(s) for s in data["slots"]],
                            next_id=int(data["next_id"]), policy_state=data.get("policy_state", {}),
                            started_at=float(data.get("started_at", 0.0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise VnodesError(f"{self.registry_path} is not a registry this vnodes can read ({exc}); move it "
                              "aside to start an empty service there") from None

    def save(self, registry: Registry) -> None:
        """Replace ``cluster.json`` atomically. Raises ``OSError`` (the old file is kept)."""
        doc = {"version": REGISTRY_VERSION, "next_id": registry.next_id, "started_at": registry.started_at,
               "policy_state": registry.policy_state, "jobs": [j.to_json() for j in registry.jobs],
               "slots": [s.to_json() for s in registry.slots]}
        tmp = self.registry_path.with_suffix(".json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.registry_path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
