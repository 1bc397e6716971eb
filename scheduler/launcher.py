"""The local launcher: a master in this process and M worker processes on this machine.

``train(spec, steps, workers=M)`` and ``vnodes run job.py --workers M`` come here. Workers are real
processes (``python -m vnodes.runtime.agent``) that can be killed with real signals; the job goes on
with the survivors. Each gets its own device (``devices.assign_devices``: worker ``i`` on ``cuda:i``
of the visible GPUs, or of ``devices``), passed as ``--device``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from vnodes.runtime.errors import CheckpointMismatch, JobFailed
from vnodes.runtime.checkpoint import (check_checkpoint_dir, checkpoint_path, latest_checkpoint, newest_checkpoint,
                                      sweep_temporaries, verify_checkpoint)
from vnodes.runtime.plugins import PluginJob
from vnodes.runtime.engine import build_dataset
from vnodes.runtime.events import Callback, RunState
from vnodes.runtime.sampler import VNodeSampler
from vnodes.runtime.spec import JobSpec
from vnodes.runtime.train import TrainResult

from .code_package import CodePackage
from .devices import assign_devices, visible_cuda_devices
from .durable import DurableState
from .master import JobState, Master
from .metrics_stream import MetricsStream
from .plugins.host import PluginHost
from .driver import drive
from .errors import WorkersGone
from .rendezvous import RendezvousStore
from .servicer import COMMIT_WAIT_S, MasterServicer, host_port, serve

log = logging.getLogger(__name__)

TOKEN_ENV = "VNODES_TOKEN"  # what `vnodes worker --token` reads

FAREWELL_S = 10.0  # after the end: how long registered workers get to hear it (beyond any start grace left)


@dataclasses.dataclass
class MasterHandle:
    """A running master: its state, gRPC server and rendezvous store."""

    master: Master
    server: object
    store: RendezvousStore  # served on the gRPC channel: the master listens on one port only
    address: str
    _stopped: threading.Event = dataclasses.field(default_factory=threading.Event)

    def stop(self) -> None:
        self._stopped.set()
        self.server.stop(grace=0.5)
        if self.master.metrics is not None:
            self.master.metrics.close()

    def wait_for_end(self, farewell_s: float = FAREWELL_S) -> None:
        """Block until the job is done (or failed) and every worker that may still run it has heard
        so or is gone (``Master.outstanding``), then return: the caller may stop serving. A worker
        that found no master would exit non-zero (``MasterLost``) though the job finished.

        Bounded once the job is done: registered workers get ``farewell_s`` (a hung one is declared
        dead within the heartbeat timeout); a previous master's workers that have not come back are
        waited for until the start grace period ends.
        """
        master = self.master
        master.wait(lambda m: m.done, timeout_s=float("inf"))
        if not master.wait(lambda m: not m.outstanding(), timeout_s=farewell_s + master.start_grace_left_s()):
            log.warning("stopping with workers that may not have heard the job's end: %s",
                        ", ".join(master.outstanding()))

    def start_reaper(self, interval_s: float = 0.5) -> None:
        """Check heartbeats in the background (hung workers are declared dead)."""

        def reap():
            while not self._stopped.wait(interval_s):
                self.master.check_liveness()

        threading.Thread(target=reap, name="vnodes-reaper", daemon=True).start()


def build_master(spec: JobSpec, steps: int, run_dir: Path, *, checkpoint_every: int = 0,
                 expected_workers: int = 1, placement: str = "throughput", heartbeat_timeout_s: float = 10.0,
                 start_grace_s: float = 60.0, await_holders: bool = True, durable: bool = True) -> Master:
    """Validate the job and build its master, resumed from ``run_dir`` if it holds a checkpoint,
    with the job's plugins (``plugins.PluginHost``) at that checkpoint's state.

    ``await_holders``: when ``run_dir`` shows a master that stopped past its newest checkpoint, wait
    up to ``start_grace_s`` for workers that still hold that state to reconnect before rolling back
    to the checkpoint. A launcher whose workers are all new (``train``) passes False. A job with
    plugins always resumes from its newest checkpoint, whose plugin state matches it.
    ``durable``: record the master's state in ``run_dir`` at every commit (``durable.py``), for a
    restarted master; False for a master that lives and dies with its only worker (in process).

    Raises:
        InvalidJobSpec: bad input (checked here, before any worker starts).
        CheckpointMismatch: ``run_dir`` holds a checkpoint of another job.
    """
    spec.validate()
    if not durable:  # in process: no other writer can be at work in run_dir (a restarted master may have some)
        sweep_temporaries(run_dir)
    dataset = build_dataset(spec)
    dataset_size = len(dataset)
    sampler = VNodeSampler(dataset_size, spec.virtual_nodes, spec.vnode_batch_size, spec.seed)
    ckpt = latest_checkpoint(run_dir)
    start, losses, epoch_counter = 0, [], 0
    if ckpt is not None:
        ckpt.check_fingerprint(spec.fingerprint(), str(run_dir))
        start, losses = ckpt.step, list(ckpt.losses)
    state = DurableState(run_dir, spec.fingerprint()) if durable else None
    record = state.load() if state is not None else None
    if record is not None:
        differ = sorted(k for k in set(record.fingerprint) | set(state.fingerprint)
                        if record.fingerprint.get(k) != state.fingerprint.get(k))
        if differ:
            raise CheckpointMismatch(differ, str(run_dir))
    host = None
    if spec.plugins:
        job = PluginJob(dataset_size, spec.virtual_nodes, spec.vnode_batch_size, sampler.steps_per_epoch, steps,
                        spec.seed, spec.deterministic, run_dir, dataset)
        host = PluginHost(spec.plugins, job, sampler)
        host.load_state_dict(ckpt.plugins if ckpt is not None else None)
    # A master restarted on its run directory past its newest checkpoint: the workers that still hold
    # the newer state reconnect, and the master waits for them (a grace period) before rolling back
    # to the checkpoint. At the checkpoint's step (a job resumed to train longer) nobody holds more.
    # Plugins' state is known at checkpoints only: a job with plugins resumes from its checkpoint.
    restored = await_holders and record is not None and record.step > start and host is None
    # Workers of the previous master may still run the job: they reconnect (and must hear its end).
    awaited = (record.workers if record is not None else []) if await_holders else []
    awaited_told = record.told if record is not None and await_holders else []
    evaluations = list(ckpt.evaluations) if ckpt is not None else []
    if record is not None and record.step >= start:
        epoch_counter = record.epoch_counter + 1
        if host is None:
            start, losses = record.step, record.losses
            evaluations = record.evaluations or evaluations

    def on_disk() -> Optional[int]:
        # The same verified answer as ``latest_checkpoint`` above and in the workers that load it: a
        # damaged newest checkpoint was renamed aside, so nobody resumes at its step.
        found = newest_checkpoint(run_dir)
        return found[0] if found is not None else None

    def plugin_state_at(step: int) -> Optional[dict]:
        problem, data = verify_checkpoint(checkpoint_path(run_dir, step))
        return data.get("plugins") if problem is None else None

    return Master(spec.virtual_nodes, steps, start_step=start, losses=losses, checkpoint_every=checkpoint_every or 0,
                  checkpoint_step=ckpt.step if ckpt is not None else -1, expected_workers=expected_workers,
                  steps_per_epoch=sampler.steps_per_epoch, vnode_batch_size=spec.vnode_batch_size,
                  start_grace_s=start_grace_s,
                  heartbeat_timeout_s=heartbeat_timeout_s, placement_policy=placement,
                  can_resume_from_checkpoint=on_disk, durable=state, restored=restored,
                  epoch_counter=epoch_counter, awaited=awaited, awaited_told=awaited_told,
                  host=host, plugin_state_at=plugin_state_at,
                  metrics=MetricsStream(run_dir, start, spec.global_batch_size, [e["step"] for e in evaluations]),
                  eval_every=-1 if spec.eval_dataset is None else (spec.eval_every or 0), evaluations=evaluations)


def start_master(spec: JobSpec, steps: int, run_dir: Path, *, checkpoint_every: int = 0,
                 expected_workers: int = 1, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, placement: str = "throughput",
                 heartbeat_timeout_s: float = 10.0, start_grace_s: float = 60.0,
                 tls: Optional[tuple[bytes, bytes]] = None,
                 commit_timeout_s: float = COMMIT_WAIT_S, await_holders: bool = True,
                 code: Optional[CodePackage] = None) -> MasterHandle:
    """Build the job's master (``build_master``: validation, resumption, plugins) and serve it.

    ``code``: the job's folder, packed (``code_package.py``), for every admitted worker to import
    from; None: workers import the job from their own environment.

    Raises:
        InvalidJobSpec: bad input (checked here, before any worker starts).
        CheckpointMismatch: ``run_dir`` holds a checkpoint of another job.
    """
    spec.validate()
    spec.check_picklable("workers > 1 (worker processes)")
    master = build_master(spec, steps, run_dir, checkpoint_every=checkpoint_every, expected_workers=expected_workers,
                          placement=placement, heartbeat_timeout_s=heartbeat_timeout_s, start_grace_s=start_grace_s,
                          await_holders=await_holders)
    # Fresh workers hold step 0; when start > 0 the master has them load the checkpoint.
    store = RendezvousStore()
    # The superseded epoch's members learn it from EpochStatus; its keys are of no use to anyone now.
    master.on_epoch_superseded = lambda epoch: store.forget_epochs_before(epoch + 1)
    servicer = MasterServicer(master, pickle.dumps(spec), str(run_dir), checkpoint_every or 0,
                              commit_timeout_s=commit_timeout_s, code=code, store=store)
    if code is not None:
        log.info("workers get the job's code from %s: %d files, %d bytes packed, sha256 %s", code.folder,
                 code.file_count, code.size_bytes, code.digest)
    server, bound = serve(servicer, host=host, port=port, token=token, tls=tls)
    handle = MasterHandle(master, server, store, host_port(host, bound))
    handle.start_reaper()
    return handle


def spawn_worker(address: str, launch_index: int, env: Optional[dict] = None,
                 extra_args: Sequence[str] = (), stderr=None, device: Optional[str] = None) -> subprocess.Popen:
    """Start ``python -m vnodes.runtime.agent`` with this process's import path (``stderr``: as
    for ``subprocess.Popen``), on ``device`` (its ``--device``; None: the worker's default). The
    worker inherits ``CUDA_VISIBLE_DEVICES``, so ``cuda:K`` means what it means here."""
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    child_env["VNODES_LAUNCH_INDEX"] = str(launch_index)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:  # builders defined in the launching script pickle as __main__.name
        child_env["VNODES_MAIN_FILE"] = os.path.abspath(main_file)
    device_args = ("--device", device) if device is not None else ()
    return subprocess.Popen([sys.executable, "-m", "vnodes.runtime.agent", "--master", address,
                             "--launch-index", str(launch_index), *device_args, *extra_args], env=child_env,
                            stderr=stderr)


def open_run_dir(stack: contextlib.ExitStack, checkpoint_dir: Optional[Path]) -> Path:
    """The master's run directory: ``checkpoint_dir``, or a temporary one removed at the end."""
    if checkpoint_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vnodes-run-")))
    return check_checkpoint_dir(checkpoint_dir)


def job_result(master: Master, spec: JobSpec, run_dir: Path, keep_dir: bool, start: int, steps: int,
               t0: float) -> TrainResult:
    """Raise the job's failure (``JobFailed``, naming e.g. ``NonFiniteLoss``), or read the result off the
    final checkpoint."""
    if master.state == JobState.FAILED:
        f = master.failure
        raise JobFailed(f.message, f.error_type, f.traceback, f.worker_id)
    wall = time.perf_counter() - t0
    ckpt = latest_checkpoint(run_dir)
    return TrainResult(model_state_dict=ckpt.model if ckpt is not None else {}, losses=list(master.losses),
                       evaluations=list(master.evaluations),
                       steps=max(start, steps), checkpoint_dir=str(run_dir) if keep_dir else None,
                       wall_time_s=wall, samples_per_s=max(0, steps - start) * spec.global_batch_size / wall)


class LocalFleet:
    """Worker processes on this machine (``python -m vnodes.runtime.agent``), one per device in
    ``devices``; real processes, so tests kill them with real signals. The job goes on with the
    survivors; the fleet gives up only when every process has exited for ``all_gone_s``."""

    poll_s = 0.2

    def __init__(self, address: str, devices: Sequence[Optional[str]], env: dict[str, str],
                 all_gone_s: float = 30.0):
        self.processes = [spawn_worker(address, i, env, device=device) for i, device in enumerate(devices)]
        self.all_gone_s = all_gone_s
        self._all_gone_since: Optional[float] = None

    def tend(self, master: Master) -> None:
        """Raises ``WorkersGone`` once every process has exited for ``all_gone_s`` before the end."""
        if any(p.poll() is None for p in self.processes):
            self._all_gone_since = None
            return
        self._all_gone_since = self._all_gone_since or time.monotonic()
        if time.monotonic() - self._all_gone_since > self.all_gone_s and not master.done:
            raise WorkersGone(f"every local worker exited (exit codes {[p.returncode for p in self.processes]}) "
                              "before the job finished; their messages are above. Run the same command again to "
                              "resume from the last checkpoint")

    def stop(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def train_local(spec: JobSpec, steps: int, workers: int, checkpoint_dir: Optional[Path],
                checkpoint_every: Optional[int], callbacks: Sequence[Callback] = (),
                worker_env: Optional[dict] = None, placement: str = "throughput",
                master_port: int = 0, code: Optional[CodePackage] = None,
                devices: Optional[Sequence[int]] = None, share_devices: bool = False) -> TrainResult:
    """Train with a master in this process and ``workers`` local worker processes.

    ``code``: the job's code for the workers to fetch. By default none: local workers share this
    machine's files and import what this process imports (its ``sys.path``, its launching script).
    ``devices``: the GPUs to use (torch's numbers, within ``CUDA_VISIBLE_DEVICES``; default: all
    visible), one per worker unless ``share_devices`` (``devices.assign_devices``).

    Raises:
        DevicesUnavailable: the workers cannot each get a device (before anything starts).
    """
    assigned = assign_devices(workers, visible_cuda_devices(), devices, share_devices, spec.device)
    with contextlib.ExitStack() as stack:
        run_dir = open_run_dir(stack, checkpoint_dir)
        token = secrets.token_hex(16)  # loopback, yet only this job's own workers may join it
        handle = start_master(spec, steps, run_dir, checkpoint_every=checkpoint_every or 0, await_holders=False,
                              expected_workers=workers, placement=placement, port=master_port, code=code,
                              token=token)
        stack.callback(handle.stop)
        master = handle.master
        start = master.step
        state = RunState(step=start, steps=steps, start_step=start, samples_per_step=spec.global_batch_size)
        t0 = time.perf_counter()
        if steps > start:
            fleet = LocalFleet(handle.address, assigned, {**(worker_env or {}), TOKEN_ENV: token})
            stack.callback(fleet.stop)
            drive(master, fleet, callbacks, state, run_dir)
        return job_result(master, spec, run_dir, checkpoint_dir is not None, start, steps, t0)
