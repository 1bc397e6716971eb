"""The local launcher: a master in this process and M worker processes on this machine.

``train(spec, steps, workers=M)`` and ``vnodes run job.py --workers M`` come here. Workers are real
processes (``python -m vnodes.runtime.agent``) that can be killed with real signals; the job goes on
with the survivors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from vnodes.runtime.errors import CheckpointMismatch, JobFailed
from vnodes.runtime.checkpoint import check_checkpoint_dir, latest_checkpoint, newest_checkpoint
from vnodes.runtime.engine import build_dataset
from vnodes.runtime.events import Callback, Event, RunState, fire
from vnodes.runtime.sampler import VNodeSampler
from vnodes.runtime.spec import JobSpec
from vnodes.runtime.train import TrainResult

from .code_package import CodePackage
from .durable import DurableState
from .master import JobState, Master
from .rendezvous import RendezvousStore
from .servicer import COMMIT_WAIT_S, MasterServicer, host_port, serve

log = logging.getLogger(__name__)


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

    def start_reaper(self, interval_s: float = 0.5) -> None:
        """Check heartbeats in the background (hung workers are declared dead)."""

        def reap():
            while not self._stopped.wait(interval_s):
                self.master.check_liveness()

        threading.Thread(target=reap, name="vnodes-reaper", daemon=True).start()


def start_master(spec: JobSpec, steps: int, run_dir: Path, *, checkpoint_every: int = 0,
                 expected_workers: int = 1, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, placement: str = "throughput",
                 heartbeat_timeout_s: float = 10.0, start_grace_s: float = 60.0,
                 tls: Optional[tuple[bytes, bytes]] = None,
                 commit_timeout_s: float = COMMIT_WAIT_S, await_holders: bool = True,
                 code: Optional[CodePackage] = None) -> MasterHandle:
    """Validate the job, resume from ``run_dir`` if it holds a checkpoint, and serve the master.

    ``await_holders``: when ``run_dir`` shows a master that stopped past its newest checkpoint, wait
    up to ``start_grace_s`` for workers that still hold that state to reconnect before rolling back
    to the checkpoint. A launcher whose workers are all new (``train``) passes False.

    ``code``: the job's folder, packed (``code_package.py``), for every admitted worker to import
    from; None: workers import the job from their own environment.

    Raises:
        InvalidJobSpec: bad input (checked here, before any worker starts).
        CheckpointMismatch: ``run_dir`` holds a checkpoint of another job.
    """
    spec.validate()
    spec.check_picklable("workers > 1 (worker processes)")
    sampler = VNodeSampler(len(build_dataset(spec)), spec.virtual_nodes, spec.vnode_batch_size, spec.seed)
    ckpt = latest_checkpoint(run_dir)
    start, losses, epoch_counter = 0, [], 0
    if ckpt is not None:
        ckpt.check_fingerprint(spec.fingerprint(), str(run_dir))
        start, losses = ckpt.step, list(ckpt.losses)
    durable = DurableState(run_dir, spec.fingerprint())
    record = durable.load()
    if record is not None:
        differ = sorted(k for k in set(record.fingerprint) | set(durable.fingerprint)
                        if record.fingerprint.get(k) != durable.fingerprint.get(k))
        if differ:
            raise CheckpointMismatch(differ, str(run_dir))
    # A master restarted on its run directory past its newest checkpoint: the workers that still hold
    # the newer state reconnect, and the master waits for them (a grace period) before rolling back
    # to the checkpoint. At the checkpoint's step (a job resumed to train longer) nobody holds more.
    restored = await_holders and record is not None and record.step > start
    if record is not None and record.step >= start:
        start, losses, epoch_counter = record.step, record.losses, record.epoch_counter + 1

    def on_disk() -> Optional[int]:
        # The same verified answer as ``latest_checkpoint`` above and in the workers that load it: a
        # damaged newest checkpoint was renamed aside, so nobody resumes at its step.
        found = newest_checkpoint(run_dir)
        return found[0] if found is not None else None

    master = Master(spec.virtual_nodes, steps, start_step=start, losses=losses, checkpoint_every=checkpoint_every or 0,
                    checkpoint_step=ckpt.step if ckpt is not None else -1, expected_workers=expected_workers,
                    steps_per_epoch=sampler.steps_per_epoch, vnode_batch_size=spec.vnode_batch_size,
                    start_grace_s=start_grace_s,
                    heartbeat_timeout_s=heartbeat_timeout_s, placement_policy=placement,
                    can_resume_from_checkpoint=on_disk, durable=durable, restored=restored,
                    epoch_counter=epoch_counter)
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
                 extra_args: Sequence[str] = (), stderr=None) -> subprocess.Popen:
    """Start ``python -m vnodes.runtime.agent`` with this process's import path (``stderr``: as
    for ``subprocess.Popen``)."""
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    child_env["VNODES_LAUNCH_INDEX"] = str(launch_index)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:  # builders defined in the launching script pickle as __main__.name
        child_env["VNODES_MAIN_FILE"] = os.path.abspath(main_file)
    return subprocess.Popen([sys.executable, "-m", "vnodes.runtime.agent", "--master", address,
                             "--launch-index", str(launch_index), *extra_args], env=child_env, stderr=stderr)


def open_run_dir(stack: contextlib.ExitStack, checkpoint_dir: Optional[Path]) -> Path:
    """The master's run directory: ``checkpoint_dir``, or a temporary one removed at the end."""
    if checkpoint_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vnodes-run-")))
    return check_checkpoint_dir(checkpoint_dir)


def fire_commits(master: Master, seen: int, callbacks: Sequence[Callback], state: RunState) -> int:
    """Fire ``on_step_end`` for every step committed since the first ``seen``; return the new count."""
    new, count = master.committed_since(seen)
    for c in new:
        state.step, state.loss, state.step_time_s = c.step + 1, c.loss, c.step_time_s
        fire(list(callbacks), Event.STEP_END, state)
    return count


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
                       steps=max(start, steps), checkpoint_dir=str(run_dir) if keep_dir else None,
                       wall_time_s=wall, samples_per_s=max(0, steps - start) * spec.global_batch_size / wall)


def run_until_done(handle: MasterHandle, processes: list[subprocess.Popen], callbacks: Sequence[Callback],
                   state: RunState, all_dead_timeout_s: float = 30.0) -> None:
    """Fire callbacks as steps commit; return when the job is done or failed.

    Raises:
        RuntimeError: every local worker exited and none came back within ``all_dead_timeout_s``.
    """
    master, seen, all_dead_since = handle.master, 0, None
    while not master.done:
        master.wait(lambda m: m.done or m.committed_count > seen, timeout_s=0.2)
        seen = fire_commits(master, seen, callbacks, state)
        if all(p.poll() is not None for p in processes):
            all_dead_since = all_dead_since or time.monotonic()
            if time.monotonic() - all_dead_since > all_dead_timeout_s and not master.done:
                codes = [p.returncode for p in processes]
                raise RuntimeError(f"every local worker exited (exit codes {codes}) before the job finished")
        else:
            all_dead_since = None


def train_local(spec: JobSpec, steps: int, workers: int, checkpoint_dir: Optional[Path],
                checkpoint_every: Optional[int], callbacks: Sequence[Callback] = (),
                worker_env: Optional[dict] = None, placement: str = "throughput",
                master_port: int = 0, code: Optional[CodePackage] = None) -> TrainResult:
    """Train with a master in this process and ``workers`` local worker processes.

    ``code``: the job's code for the workers to fetch. By default none: local workers share this
    machine's files and import what this process imports (its ``sys.path``, its launching script).
    """
    with contextlib.ExitStack() as stack:
        run_dir = open_run_dir(stack, checkpoint_dir)
        handle = start_master(spec, steps, run_dir, checkpoint_every=checkpoint_every or 0, await_holders=False,
                              expected_workers=workers, placement=placement, port=master_port, code=code)
        stack.callback(handle.stop)
        master = handle.master
        start = master.step
        state = RunState(step=start, steps=steps, start_step=start, samples_per_step=spec.global_batch_size)
        t0 = time.perf_counter()
        processes: list[subprocess.Popen] = []
        stack.callback(_reap, processes)
        if steps > start:
            for i in range(workers):
                processes.append(spawn_worker(handle.address, i, worker_env))
            fire(list(callbacks), Event.FIT_START, state)
            try:
                run_until_done(handle, processes, callbacks, state)
            finally:
                fire(list(callbacks), Event.FIT_END, state)
        return job_result(master, spec, run_dir, checkpoint_dir is not None, start, steps, t0)


def _reap(processes: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
