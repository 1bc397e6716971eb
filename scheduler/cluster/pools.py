"""The cluster service's workers: local processes (``LocalPool``) or Ray actors (``RayPool``).

A pool has ``size`` slots. The service starts a worker in a free slot for one job (``spawn``: a
``vnodes worker`` of that job's master), tells it to leave at the next step boundary (``drain``),
and frees the slot once it has exited (``alive`` is False). A worker is never re-pointed at another
job: it leaves, and a new one joins the other job. So each job's workers run only that job's code.

Local workers are real processes on this machine (one per GPU, or CPU processes), drained with
SIGTERM; they outlive a SIGKILLed service, which adopts them again (``adopt``). Ray workers are
actors that ask Ray for one device each (``num_gpus=1`` on a GPU cluster, else ``num_cpus``), placed
by Ray; they are drained through a method call and die with the service's Ray driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import psutil

from .registry import ProcessRecord, SlotRecord

log = logging.getLogger(__name__)

WORKER_CONNECT_TIMEOUT_S = 120.0  # a worker may start before its job's master is up (a loaded machine: tens of seconds)


def _same_process(record: ProcessRecord) -> Optional[psutil.Process]:
    """The running process ``record`` names, or None (gone, a zombie, or the pid reused since)."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > 0.01 or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def process_record(pid: int) -> ProcessRecord:
    return ProcessRecord(pid, psutil.Process(pid).create_time())


def process_alive(record: Optional[ProcessRecord]) -> bool:
    return record is not None and _same_process(record) is not None


def signal_process(record: ProcessRecord, signum: int) -> None:
    """Send ``signum`` to the process ``record`` names, if it still runs (never to a reused pid)."""
    process = _same_process(record)
    if process is not None:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)


def child_env(token: str) -> dict[str, str]:
    """A child's environment: this process's import path, and the jobs' token (never on a command line)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["VNODES_TOKEN"] = token
    return env


class LocalPool:
    """``size`` worker processes on this machine, worker ``k`` on ``devices[k]``."""

    kind = "local"

    def __init__(self, size: int, devices: list[str]):
        self.size, self.devices = size, devices
        self._children: dict[int, subprocess.Popen] = {}  # slot -> its process, if this service started it

    def spawn(self, slot: int, address: str, token: str, log_path: Path) -> Optional[ProcessRecord]:
        with open(log_path, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "vnodes.runtime.agent", "--master", address,
                                        "--device", self.devices[slot], "--launch-index", str(slot),
                                        "--connect-timeout", str(WORKER_CONNECT_TIMEOUT_S)],
                                       env=child_env(token), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # a Ctrl-C to the service is not theirs
        self._children[slot] = process
        return process_record(process.pid)

    def adopt(self, record: SlotRecord) -> bool:
        """Whether the worker ``record`` names (a previous service's) still runs: then it is kept."""
        return process_alive(record.process)

    def drain(self, record: SlotRecord) -> None:
        if record.process is not None:
            signal_process(record.process, signal.SIGTERM)

    def kill(self, record: SlotRecord) -> None:
        if record.process is not None:
            signal_process(record.process, signal.SIGKILL)

    def alive(self, record: SlotRecord) -> bool:
        child = self._children.get(record.slot)
        if child is not None and record.process is not None and child.pid == record.process.pid:
            if child.poll() is None:
                return True
            del self._children[record.slot]  # reaped
            return False
        return process_alive(record.process)

    def close(self) -> None:
        """Leave the workers running (a restarted service adopts them)."""


class PoolWorkerActor:
    """A Ray actor running one ``WorkerAgent`` (threaded: ``drain`` is served while ``run`` works)."""

    def __init__(self):
        self.agent = None
        self.drain_requested = False

    def run(self, master: str, token: str, slot: int, env: dict[str, str]) -> int:
        os.environ.update(env)
        for path in env.get("PYTHONPATH", "").split(os.pathsep):  # the job's modules, as on the service
            if path and path not in sys.path:
                sys.path.append(path)
        import ray

        from vnodes.runtime.agent import WorkerAgent, master_timeout_from_env
        from vnodes.runtime.watchdog import hang_timeout_from_env

        device = "cuda:0" if ray.get_gpu_ids() else None  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.agent = WorkerAgent(master, device=device, token=token, launch_index=slot,
                                 reconnect_timeout_s=master_timeout_from_env(), hang_timeout_s=hang_timeout_from_env(),
                                 connect_timeout_s=WORKER_CONNECT_TIMEOUT_S)
        if self.drain_requested:
            self.agent.drain()
        return self.agent.run()

    def drain(self) -> None:
        self.drain_requested = True
        if self.agent is not None:
            self.agent.drain()


class RayPool:
    """Worker actors on a Ray cluster, one per slot; ``size`` defaults to what the cluster holds
    (its GPUs, else its CPUs over ``num_cpus``)."""

    kind = "ray"

    def __init__(self, size: Optional[int], num_cpus: float = 1.0, address: Optional[str] = None):
        try:
            import ray
        except ImportError:
            raise ImportError("--launcher ray needs Ray: pip install 'vnodes[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.num_gpus = 1.0 if gpus else 0.0
        self.num_cpus = num_cpus
        held = gpus if gpus else int(resources.get("CPU", 0) // num_cpus)
        self.size = size if size is not None else max(1, held)
        self._actor_class = ray.remote(max_concurrency=2)(PoolWorkerActor)
        self._actors: dict[int, tuple[Any, Any]] = {}  # slot -> (actor, ref of its run)

    def spawn(self, slot: int, address: str, token: str, log_path: Path) -> Optional[ProcessRecord]:
        actor = self._actor_class.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0).remote()
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        for name in ("VNODES_HANG_TIMEOUT", "VNODES_MASTER_TIMEOUT"):  # actors start from the raylet's environment
            if name in os.environ:
                env[name] = os.environ[name]
        self._actors[slot] = (actor, actor.run.remote(address, token, slot, env))
        return None

    def adopt(self, record: SlotRecord) -> bool:
        return False  # a previous service's actors died with its driver

    def drain(self, record: SlotRecord) -> None:
        entry = self._actors.get(record.slot)
        if entry is not None:
            entry[0].drain.remote()

    def kill(self, record: SlotRecord) -> None:
        entry = self._actors.pop(record.slot, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(entry[0])

    def alive(self, record: SlotRecord) -> bool:
        entry = self._actors.get(record.slot)
        if entry is None:
            return False
        done, _ = self.ray.wait([entry[1]], timeout=0)
        if not done:
            return True
        try:
            self.ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - the actor or its node died: the job redid the step
            log.warning("worker actor in slot %d ended: %s", record.slot, str(exc)[-500:])
        del self._actors[record.slot]
        return False

    def close(self) -> None:
        for slot in list(self._actors):
            self.kill(SlotRecord(slot, "", None))
