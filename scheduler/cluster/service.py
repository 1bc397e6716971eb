"""The cluster service (``vnodes cluster``): many elastic jobs on one pool of workers.

Each submitted job gets a master of its own, a ``vnodes master`` process on this machine (so one
job's code never runs in the service, and a job outlives a service restart). The service moves
workers between the masters by a policy of ``policies.py``, the same code the simulator runs::

    every interval_s (and at once on a submission or cancellation):
        reap:    workers that exited free their slots; a master that exited ends its job
                 (RUN_DIR/outcome.json says done or failed) or, dead early, is restarted
        observe: each master's step (its Status RPC); steps/s measured per worker count
        decide:  allocation = policy(snapshot)                       (reconcile.snapshot)
        act:     drain the workers a job loses (they leave at the step boundary), start masters,
                 start workers in the freed slots                     (reconcile.reconcile)
        persist: cluster.json                                         (registry.py)

A job's result does not depend on its worker count, so none of this changes what any job
computes. The service's state is durable: SIGKILLed and restarted on the same ``--run-dir``, it
adopts the masters and workers that still run and restarts the masters that died (they resume from
their run directories; their workers reconnect).

Stopping the service (SIGTERM, Ctrl-C) leaves local jobs running, as a SIGKILL would: restart the
service to manage them again, or ``vnodes cancel`` them first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Optional

from vnodes.runtime.errors import VnodesError

from ..durable import clear_outcome, read_outcome
from ..errors import BadRequest
from ..job_options import MAX_STEPS, parse_overrides
from ..servicer import host_port
from .policies import ELASTIC, check_allocation, policy_named
from .pools import child_env, process_alive, process_record, signal_process
from .reconcile import Drain, Spawn, StartMaster, StopMaster, live_slots, reconcile, snapshot
from .registry import ClusterJobState, JobRecord, SlotRecord, StateDir

log = logging.getLogger(__name__)

MAX_MASTER_STARTS = 3  # a master that dies this often without recording an outcome fails its job
RATE_SMOOTHING = 0.3  # weight of a new steps/s sample in a job's measured rate
_NAME = re.compile(r"^[\w.:+-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class Submission:
    """A job as ``vnodes submit`` sends it (``service_rpc.py`` converts the message)."""

    name: str
    job: str
    code: bytes
    steps: int
    priority: int
    run_dir: str
    deterministic: bool
    overrides: tuple[str, ...]
    virtual_nodes: int
    requested_workers: int
    checkpoint_every: int


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class ClusterService:
    def __init__(self, state_dir: StateDir, pool, policy: str = "vnodes", host: str = "127.0.0.1",
                 interval_s: float = 1.0):
        """``state_dir`` opened (locked) by the caller; ``pool``: a ``pools.LocalPool`` or ``RayPool``.

        Raises:
            ValueError: an unknown ``policy``.
        """
        self.state_dir, self.pool, self.host, self.interval_s = state_dir, pool, host, interval_s
        self.policy_name, self.policy = policy, policy_named(policy)
        self.registry = state_dir.load()
        if not self.registry.started_at:
            self.registry.started_at = time.time()
        self.token = state_dir.token()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._masters: dict[str, subprocess.Popen] = {}  # job id -> its master, if this service started it
        self._clients: dict[str, object] = {}  # job id -> MasterClient (status polls)
        self._observed: dict[str, tuple[float, int, int]] = {}  # job id -> (time, step, workers) last seen
        self._last_tick: Optional[float] = None
        self._reserved: set[Path] = set()  # run directories of submissions being unpacked
        self._adopt()

    # ---- requests (any thread) -------------------------------------------------------------

    def submit(self, sub: Submission) -> str:
        """Check ``sub``, keep its code and queue it. Returns the job's id.

        Raises:
            BadRequest: a field is unusable (named, with the fix); nothing is kept.
        """
        self._check(sub)
        with self.lock:
            for other in self.registry.jobs:
                if not other.state.final and Path(other.run_dir) == Path(sub.run_dir):
                    raise BadRequest(f"run_dir {sub.run_dir} is in use by job {other.id} ({other.name}, "
                                     f"{other.state.value}); pass another --run-dir, or cancel {other.id} first")
            if Path(sub.run_dir) in self._reserved:
                raise BadRequest(f"run_dir {sub.run_dir} is in use by a job being submitted; pass another --run-dir")
            self._reserved.add(Path(sub.run_dir))  # until the job is queued: two submits cannot both pass
            job_id = f"j{self.registry.next_id}"
            self.registry.next_id += 1
        try:
            folder = self.state_dir.job_dir(job_id)
            self._unpack(sub, folder)
        except BaseException:
            with self.lock:
                self._reserved.discard(Path(sub.run_dir))
            raise
        record = JobRecord(id=job_id, name=sub.name, job=sub.job, steps=sub.steps, priority=sub.priority,
                           run_dir=sub.run_dir, deterministic=sub.deterministic, overrides=list(sub.overrides),
                           virtual_nodes=sub.virtual_nodes,
                           requested_workers=sub.requested_workers or sub.virtual_nodes,
                           checkpoint_every=sub.checkpoint_every, submitted_at=time.time())
        with self.lock:
            self.registry.jobs.append(record)
            self._reserved.discard(Path(sub.run_dir))
            self._save()
        log.info("job %s (%s) submitted: %d steps, priority %d, %d virtual nodes", job_id, sub.name, sub.steps,
                 sub.priority, sub.virtual_nodes)
        self.wake.set()
        return job_id

    def jobs(self) -> list[dict]:
        """Every job, in submission order, as ``vnodes jobs --json`` prints it."""
        with self.lock:
            return [{"id": j.id, "name": j.name, "state": j.state.value, "priority": j.priority,
                     "workers": len(live_slots(self.registry.slots, j.id)), "step": j.step, "steps": j.steps,
                     "run_dir": j.run_dir, "message": j.message, "submitted_at": j.submitted_at,
                     "virtual_nodes": j.virtual_nodes, "resizes": j.resizes} for j in self.registry.jobs]

    def cancel(self, job_id: str) -> str:
        """Cancel a job; returns its state now (``cancelled`` at once if it never started; a started
        one becomes so once its workers have left and its master has stopped).

        Raises:
            KeyError: no job has that id.
        """
        with self.lock:
            job = self.registry.job(job_id)
            if job.state.final:
                return job.state.value
            job.cancel_requested = True
            if job.master is None:
                self._finish(job, ClusterJobState.CANCELLED, "cancelled before it started")
            self._save()
        self.wake.set()
        return job.state.value

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick every ``interval_s`` (or at once when woken) until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not end the service; the next one retries
                log.exception("cluster service tick failed")
            self.wake.wait(self.interval_s)
            self.wake.clear()

    def tick(self) -> None:
        """One round of reap, observe, decide, act, persist (module docstring)."""
        self._observe()  # network calls: outside the lock
        with self.lock:
            now = time.time()
            dt = 0.0 if self._last_tick is None else max(0.0, now - self._last_tick)
            self._last_tick = now
            before = {j.id: len(live_slots(self.registry.slots, j.id)) for j in self.registry.jobs}
            self._reap()
            for job in self.registry.jobs:
                job.attained_worker_s += before.get(job.id, 0) * dt
            snap = snapshot(self.registry.jobs, self.registry.slots, now, self.pool.size)
            allocation, state = self.policy(snap, self.registry.policy_state)
            check_allocation(snap, allocation, self.policy_name in ELASTIC, self.policy_name)
            self.registry.policy_state = dict(state)
            masters_up = {j.id for j in self.registry.jobs if j.master is not None}
            for action in reconcile(self.registry.jobs, self.registry.slots, allocation, masters_up, self.pool.size):
                self._apply(action)
            for job in self.registry.jobs:
                if job.state.final:
                    continue
                now_held = len(live_slots(self.registry.slots, job.id))
                if before.get(job.id, 0) and now_held != before[job.id]:
                    job.resizes += 1
                job.state = ClusterJobState.RUNNING if now_held else ClusterJobState.QUEUED
            self._save()

    # ---- acting --------------------------------------------------------------------------------

    def _apply(self, action) -> None:
        registry = self.registry
        if isinstance(action, Drain):
            slot = next(s for s in registry.slots if s.slot == action.slot)
            slot.draining = True
            if registry.job(action.job_id).state.final:  # its master is gone: nothing to drain from
                self.pool.kill(slot)
            else:
                self.pool.drain(slot)
            log.info("job %s: worker %d leaves at the step boundary", action.job_id, action.slot)
        elif isinstance(action, StartMaster):
            self._start_master(registry.job(action.job_id))
        elif isinstance(action, StopMaster):
            job = registry.job(action.job_id)
            if job.master is not None:
                signal_process(job.master, signal.SIGTERM)
        elif isinstance(action, Spawn):
            job = registry.job(action.job_id)
            log_path = self.state_dir.job_dir(job.id) / f"worker-{action.slot}.log"
            process = self.pool.spawn(action.slot, self._address(job), self.token, log_path)
            registry.slots.append(SlotRecord(action.slot, job.id, process))
            self._save()
            log.info("job %s: worker %d joins", job.id, action.slot)

    def _address(self, job: JobRecord) -> str:
        return host_port(self.host, job.port)

    def _start_master(self, job: JobRecord) -> None:
        if not job.port:  # kept for the job's life: workers reconnect there to a restarted master
            job.port = _free_port(self.host)
        folder = self.state_dir.job_dir(job.id)
        command = [sys.executable, "-m", "vnodes.scheduler.cli", "master", str(folder / "code" / job.job),
                   "--steps", str(job.steps), "--run-dir", job.run_dir, "--host", self.host, "--port", str(job.port)]
        if job.checkpoint_every:
            command += ["--checkpoint-every", str(job.checkpoint_every)]
        if job.deterministic:
            command.append("--deterministic")
        for item in job.overrides:
            command += ["--set", item]
        clear_outcome(Path(job.run_dir))  # a previous run's outcome there must not end this job
        with open(folder / "master.log", "ab") as out:
            process = subprocess.Popen(command, env=child_env(self.token), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self._masters[job.id] = process
        job.master = process_record(process.pid)
        job.master_starts += 1
        self._save()  # recorded at once: a service killed now adopts it rather than start a second one
        self._clients.pop(job.id, None)
        log.info("job %s: master started on %s (start %d)", job.id, self._address(job), job.master_starts)

    def _finish(self, job: JobRecord, state: ClusterJobState, message: str = "") -> None:
        job.state, job.message, job.finished_at = state, message, time.time()
        job.master = None
        self._masters.pop(job.id, None)
        client = self._clients.pop(job.id, None)
        if client is not None:
            client.close()
        log.info("job %s: %s%s", job.id, state.value, f" ({message})" if message else "")

    # ---- reaping and observing -----------------------------------------------------------------

    def _reap(self) -> None:
        """Free the slots of exited workers; end (or restart) the jobs whose master exited."""
        self.registry.slots = [s for s in self.registry.slots if self.pool.alive(s)]
        for job in self.registry.jobs:
            if job.state.final or job.master is None or self._master_alive(job):
                continue
            exit_code = self._masters[job.id].returncode if job.id in self._masters else None
            outcome = read_outcome(Path(job.run_dir))
            log_path = self.state_dir.job_dir(job.id) / "master.log"
            if job.cancel_requested:
                self._finish(job, ClusterJobState.CANCELLED, "cancelled")
            elif outcome is not None and outcome["state"] == "done":
                job.step = int(outcome.get("step", job.steps))
                self._finish(job, ClusterJobState.DONE)
            elif outcome is not None:
                self._finish(job, ClusterJobState.FAILED, outcome.get("message", "") or "failed")
            elif exit_code == 2 or job.master_starts >= MAX_MASTER_STARTS:  # 2: the job cannot start at all
                why = _log_tail(log_path) or f"its master exited with code {exit_code}"
                self._finish(job, ClusterJobState.FAILED, f"{why} (log: {log_path})")
            else:  # died without an outcome (killed): started again on its port by reconcile
                log.warning("job %s: its master exited (code %s) before the job's end; restarting it", job.id,
                            exit_code)
                job.master = None
                self._masters.pop(job.id, None)

    def _master_alive(self, job: JobRecord) -> bool:
        child = self._masters.get(job.id)
        if child is not None:
            return child.poll() is None
        return process_alive(job.master)

    def _observe(self) -> None:
        """Each running master's step, and the job's steps/s at its worker count."""
        from vnodes.runtime.master_client import MasterClient

        with self.lock:
            polled = [(j.id, self._address(j), len(live_slots(self.registry.slots, j.id)))
                      for j in self.registry.jobs if not j.state.final and j.master is not None]
        for job_id, address, workers in polled:
            client = self._clients.get(job_id)
            if client is None:
                client = self._clients[job_id] = MasterClient(address, self.token)
            try:
                status = client.status(timeout_s=2.0)
            except VnodesError:
                continue  # starting, or restarting: the next tick asks again
            now, step = time.time(), int(status["step"])
            with self.lock:
                try:
                    job = self.registry.job(job_id)
                except KeyError:
                    continue
                job.step = max(job.step, min(step, job.steps))
                if status.get("state") == "done":  # saying goodbye to its workers: it needs no more
                    job.step = job.steps
                seen = self._observed.get(job_id)
                self._observed[job_id] = (now, step, workers)
                if seen is not None and seen[2] == workers and workers and step > seen[1] and now > seen[0]:
                    rate = (step - seen[1]) / (now - seen[0])
                    key = str(workers)
                    old = job.rates.get(key)
                    job.rates[key] = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate

    def _adopt(self) -> None:
        """A restarted service: keep the workers and masters that still run."""
        kept = []
        for slot in self.registry.slots:
            if self.pool.adopt(slot):
                kept.append(slot)
            else:
                log.info("worker %d of job %s is gone", slot.slot, slot.job_id)
        self.registry.slots = kept
        for job in self.registry.jobs:
            if job.master is not None and not process_alive(job.master):
                log.info("job %s: its master is gone", job.id)
        self._save()

    # ---- checking and keeping ------------------------------------------------------------------

    def _check(self, sub: Submission) -> None:
        if not _NAME.match(sub.name or ""):
            raise BadRequest(f"name {sub.name[:64]!r} must be 1-128 letters, digits or . _ : + -")
        path = PurePosixPath(sub.job.partition(":")[0])
        if path.is_absolute() or ".." in path.parts or path.suffix != ".py":
            raise BadRequest(f"job {sub.job[:200]!r} must name a .py file inside the submitted folder")
        if not 1 <= sub.steps <= MAX_STEPS:
            raise BadRequest(f"steps {sub.steps} must be between 1 and {MAX_STEPS}; pass --steps K")
        if not 1 <= sub.priority <= 1000:
            raise BadRequest(f"priority {sub.priority} must be between 1 and 1000 (a weight: higher runs "
                             "first); pass --priority P")
        if not os.path.isabs(sub.run_dir) or len(sub.run_dir) > 4096:
            raise BadRequest(f"run_dir {sub.run_dir[:200]!r} must be an absolute path on the service's machine")
        state = self.state_dir.path
        run_dir = Path(sub.run_dir)
        if run_dir == state or state in run_dir.parents:
            raise BadRequest(f"run_dir {sub.run_dir} lies in the service's own --run-dir {state}; pass a folder "
                             "outside it")
        if not 1 <= sub.virtual_nodes <= 65536:
            raise BadRequest(f"virtual_nodes {sub.virtual_nodes} must be between 1 and 65536")
        if not 0 <= sub.requested_workers <= 65536:
            raise BadRequest(f"requested_workers {sub.requested_workers} must be between 0 (all virtual nodes) "
                             "and 65536; pass --workers N")
        if not 0 <= sub.checkpoint_every <= MAX_STEPS:
            raise BadRequest(f"checkpoint_every {sub.checkpoint_every} is out of range")
        if len(sub.overrides) > 256:
            raise BadRequest(f"{len(sub.overrides)} overrides: at most 256")
        try:
            parse_overrides(list(sub.overrides))
        except VnodesError as exc:
            raise BadRequest(str(exc)) from None
        if not sub.code:
            raise BadRequest("the job's code is empty: submit with `vnodes submit JOB.py`, which packs its folder")

    def _unpack(self, sub: Submission, folder: Path) -> None:
        """The submitted folder under ``folder/code``, checked entry by entry (``code_cache.unpack``).

        Raises:
            BadRequest: not a safe zip, or the job file is not in it (nothing is kept).
        """
        import hashlib
        import shutil

        from vnodes.runtime.code_cache import unpack

        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / "code.zip"
        try:
            archive.write_bytes(sub.code)
            unpack(archive, folder / "code", hashlib.sha256(sub.code).hexdigest())
            if not (folder / "code" / sub.job.partition(":")[0]).is_file():
                raise BadRequest(f"job file {sub.job.partition(':')[0]!r} is not in the submitted folder")
        except VnodesError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise exc if isinstance(exc, BadRequest) else BadRequest(str(exc)) from None
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise VnodesError(f"cannot keep the job's code in {folder}: {exc.strerror}") from None
        finally:
            archive.unlink(missing_ok=True)

    def _save(self) -> None:
        try:
            self.state_dir.save(self.registry)
        except OSError as exc:  # the last good registry stays on disk; the next change tries again
            log.error("cannot write %s (%s): a restart would see the state before this change",
                      self.state_dir.registry_path, exc.strerror)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self.pool.close()
