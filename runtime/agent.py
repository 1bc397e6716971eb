"""The worker agent: joins a master, runs the virtual nodes it is given, survives its peers.

    vnodes worker --master HOST:PORT [--device cuda:1] [--master-timeout 60]

One step, seen from a worker (every point where processes synchronise is marked)::

    plan = master.plan()                       # SYNC (master): RUN(e, s) | CHECKPOINT | WAIT | STOP
    if e is new: form the epoch-e group        # SYNC (store rendezvous of every member)
                 receive state if told to      # SYNC (broadcast from sync_source_rank)
    partial = engine.compute(s, my vnodes)
    total = group.reduce(partial)              # SYNC (all-reduce / all-gather); a lost peer raises
    decision = commit(e, s, ok)                # SYNC (master, on the session stream): all reported -> COMMIT
    if COMMIT: engine.apply(total); held = s+1 # else ABORT: keep the state of s, redo it in e+1

``vnode_id`` survives every remap; ``worker_rank`` changes with every membership epoch.
SIGTERM drains: the current step finishes (or aborts), the worker leaves at the boundary, exit 0.

The device: the job's ``JobSpec.device`` fixes its type; ``--device`` (a launcher's assignment)
picks which one; a bare ``cuda`` is ``LOCAL_RANK``'s device, else ``cuda:0`` (``devices.py``).

A lost master (killed, restarting, unreachable) is retried: the worker keeps its state and registers
again, under the same id and with the step it holds, with whichever master answers at the same
address. It gives up ``--master-timeout`` seconds (default 60, env ``VNODES_MASTER_TIMEOUT``) after
it noticed the loss (a broken session stream or call), and exits with code 4.

Exit codes:

    0  the master said stop: the job finished (or failed elsewhere), or this worker left (SIGTERM)
    2  this worker cannot run: bad arguments, refused by the master (token, protocol), the job's code
       or spec unusable here, or no master answered at start (within --connect-timeout)
    3  hung: the watchdog ended it (``watchdog.py``); the job goes on without it
    4  master lost: the master went away mid-job and none answered within --master-timeout
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from typing import Optional

import psutil
import torch

from .checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from .code_cache import install as install_code
from .collectives import EpochGroup, SoloGroup
from .engine import StepEngine, resolve_device
from .errors import JobCodeMissing, MasterLost, PeerLost, StaleEpoch, StorageError, VnodesError
from .events import Event
from .faults import FaultInjector
from .logs import LOG_FORMAT_ENV, configure_logging, set_log_context
from .master_client import MasterClient, MasterUnavailable, PlanView, read_pem
from .train import execution_context
from .watchdog import DEFAULT_HANG_TIMEOUT_S, Watchdog, hang_timeout_from_env

log = logging.getLogger(__name__)

EXIT_FATAL = 2  # this worker cannot run (see the module docstring)
EXIT_MASTER_LOST = 4  # the master went away mid-job and did not come back in time
DEFAULT_MASTER_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # how long a new worker tries to reach its master at start


def master_timeout_from_env() -> float:
    """``VNODES_MASTER_TIMEOUT`` (seconds a worker waits for a lost master), else 60.

    Raises:
        VnodesError: it is not a positive number.
    """
    text = os.environ.get("VNODES_MASTER_TIMEOUT")
    if text is None:
        return DEFAULT_MASTER_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise VnodesError(f"VNODES_MASTER_TIMEOUT={text!r} is not a positive number of seconds")
    return value


def load_job(data: bytes, main_file: Optional[str] = None, code_dir: str = ""):
    """Unpickle the job, resolving ``__main__`` to the launching script (as multiprocessing does).

    A script that calls ``train(spec, workers=3)`` defines its builders in ``__main__``; here that
    script is imported under another name, so its ``if __name__ == "__main__":`` block does not run.
    ``main_file`` is that script in the code the master shipped (``code_cache.install``; unpacked
    in ``code_dir``); without one, ``VNODES_MAIN_FILE`` (set for local workers of a script run with
    ``python -m``, whose folder is not shipped).

    Raises:
        JobCodeMissing: a module the job refers to (or a name in it) cannot be imported here.
    """
    main_file = main_file or os.environ.get("VNODES_MAIN_FILE")

    class JobUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return self._find_class(module, name)
            except ModuleNotFoundError as exc:  # the job's module, or one it imports
                raise JobCodeMissing(exc.name or module, "", f"{type(exc).__name__}: {exc}", code_dir) from exc
            except AttributeError as exc:
                raise JobCodeMissing(module, name, f"{type(exc).__name__}: {exc}", code_dir) from exc

        def _find_class(self, module, name):
            if module == "__main__" and main_file:
                main = sys.modules.get("__vnodes_main__")
                if main is None:
                    import importlib.util

                    spec = importlib.util.spec_from_file_location("__vnodes_main__", main_file)
                    main = importlib.util.module_from_spec(spec)
                    sys.modules["__vnodes_main__"] = main
                    try:
                        spec.loader.exec_module(main)
                    except BaseException:
                        del sys.modules["__vnodes_main__"]  # half-run: never hand it out
                        raise
                return getattr(main, name)
            return super().find_class(module, name)

    return JobUnpickler(io.BytesIO(data)).load()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _describe_device(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.total_memory
    return "cpu", psutil.virtual_memory().total


class WorkerAgent:
    def __init__(self, master: str, device: Optional[str] = None, token: Optional[str] = None,
                 launch_index: int = -1, throughput: float = 0.0, slowdown: float = 1.0,
                 reconnect_timeout_s: float = DEFAULT_MASTER_TIMEOUT_S, hang_timeout_s: Optional[float] = None,
                 tls_root_cert: Optional[bytes] = None, direct_client=None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
        """``device``: this worker's own device (``--device``: a launcher's assignment, or the
        operator's); the job's ``device`` fixes the type (``devices.choose_device``). Resolved in
        ``run``: nothing here touches a device. ``reconnect_timeout_s``: how long a lost master is
        retried before ``run`` raises ``MasterLost``. ``hang_timeout_s``: end this process (see
        ``watchdog.py``) when its main thread is stuck that long outside of waits on peers or the
        master. Only for a process of its own (the ``vnodes worker`` command, spawned workers, Ray
        actors); None: no watchdog. ``direct_client``: an in-process master's client
        (``scheduler/direct.py``: ``train(workers=1)``), used instead of connecting to ``master``; the
        one worker of its job, it runs in the caller's thread and raises the job's errors as they are."""
        self.master_address = master
        self.own_device = device
        self.device: Optional[torch.device] = None  # set by run()
        self.token = token
        self.tls_root_cert = tls_root_cert  # PEM of the CA that signed the master's certificate
        self.launch_index = launch_index
        self.throughput = throughput
        self.slowdown = slowdown  # test knob: >1 simulates a slower device (sleeps in proportion)
        self.reconnect_timeout_s = reconnect_timeout_s
        self.connect_timeout_s = connect_timeout_s  # how long the first registration is tried
        self._draining = False
        self._left = False
        self._next_plan: Optional[PlanView] = None
        self.watchdog = Watchdog(hang_timeout_s) if hang_timeout_s else None
        self.direct_client = direct_client
        self.engine: Optional[StepEngine] = None  # set by run()
        self.fatal: Optional[BaseException] = None  # the error this worker reported as fatal for the job
        # The loop's event subscribers (events.py): the watchdog and armed faults.
        self.subscribers = [s for s in (self.watchdog, FaultInjector.from_env()) if s is not None]

    def _emit(self, event: Event, step: int = -1, work: int = 1) -> None:
        for subscriber in self.subscribers:
            subscriber(event, step, work)

    def _on_sigterm(self, signum, frame) -> None:
        self._draining = True

    def drain(self) -> None:
        """Leave the job at the next step boundary, as SIGTERM does (callable from any thread)."""
        self._draining = True

    def run(self) -> int:
        """Join the job and work until the master says stop. Returns the exit code.

        Raises:
            InvalidJobSpec: this worker's device (or the job's) is not one this machine has.
            MasterUnavailable: no master answered at the start.
            MasterLost: the master went away mid-job and none answered within ``reconnect_timeout_s``.
        """
        if self.direct_client is None:  # in process, the caller's signal handlers stay its own
            try:
                signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread (e.g. some actor runtimes): no drain on SIGTERM
                log.info("SIGTERM drain unavailable outside the main thread")
        self.held_step, self.checkpoint_step = 0, -1
        # Before the job is known: what this worker would run a job of no stated device on (it
        # describes itself with it when registering; a bad --device fails here, before any call).
        self.device = resolve_device(None, self.own_device)
        reg = self._connect(worker_id="", timeout_s=self.connect_timeout_s)
        try:
            main_file, code_dir = None, ""
            if reg.code is not None:  # the job's folder, shipped by the master: first on sys.path
                installed = install_code(self.client, reg.code)
                main_file, code_dir = installed.main_file, str(installed.folder)
            spec = reg.spec if reg.spec is not None else load_job(reg.job, str(main_file) if main_file else None,
                                                                  code_dir)
            self.keep_checkpoints = reg.keep_checkpoints
            self._use_device(resolve_device(spec.device, self.own_device), spec.device)
        except BaseException:  # this worker cannot run the job (others may): leave, close the session
            self.group.destroy()
            self.client.close()
            raise
        if self.watchdog is not None:
            self.watchdog.start()
        try:
            with execution_context(spec):
                try:
                    engine = self.engine = StepEngine.build(spec, self.device)
                except VnodesError as exc:  # the job's own code or spec is wrong: it cannot run anywhere
                    self._report_fatal(exc)
                    raise
                engine.emit = self._emit
                self._emit(Event.FIT_START)
                self._loop(engine, reg.run_dir)
                self._emit(Event.FIT_END)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.group.destroy()
            self.client.close()
        return 0

    def _use_device(self, device: torch.device, job_device: Optional[str]) -> None:
        """Compute on ``device`` (the job's device honoured); no collective has run yet."""
        if self.own_device is not None and torch.device(self.own_device).type != device.type:
            log.warning("the job's device is %r: computing on %s, not on --device %s", job_device, device,
                        self.own_device)
        if device != self.device:  # registered with the other one: the group must use this one's backend
            log.info("the job's device %r: computing on %s (registered as %s)", job_device, device, self.device)
            self.device = device
            self.group = self._new_group()
        if device.type == "cuda":
            torch.cuda.set_device(device)  # always indexed ("cuda:K"): NCCL and the caching allocator follow it

    def _connect(self, worker_id: str, timeout_s: float):
        """(Re-)register with the master and open the heartbeat stream and the rendezvous store.

        A restarted master gets our worker id and the step whose state we hold, so it can resume
        the job with us.

        Raises:
            MasterUnavailable: no master answered within ``timeout_s``.
        """
        kind, memory = _describe_device(self.device)
        if self.direct_client is not None:  # in process: no connection to make, no session to keep
            self.client = self.direct_client
            reg = self.client.register(host=socket.gethostname(), pid=os.getpid(), device=str(self.device),
                                       device_kind=kind, memory_bytes=memory, throughput=self.throughput,
                                       launch_index=self.launch_index, worker_id=worker_id,
                                       held_step=self.held_step if worker_id else -1)
            self.worker_id, self.group = reg.worker_id, SoloGroup()
            return reg
        started = time.monotonic()
        deadline, attempts = started + timeout_s, 0
        while True:
            client = MasterClient(self.master_address, self.token, self.tls_root_cert)
            attempts += 1
            try:
                reg = client.register(host=socket.gethostname(), pid=os.getpid(), device=str(self.device),
                                      device_kind=kind, memory_bytes=memory, throughput=self.throughput,
                                      launch_index=self.launch_index, worker_id=worker_id,
                                      held_step=self.held_step if worker_id else -1,
                                      connect_timeout_s=max(1.0, min(5.0, deadline - time.monotonic())))
                break
            except MasterUnavailable as exc:
                client.close()
                if time.monotonic() >= deadline:
                    raise MasterUnavailable(self.master_address, f"no master answered for "
                                            f"{time.monotonic() - started:.0f} s ({attempts} attempts; the last: "
                                            f"{exc.detail}); check that it runs and listens there") from None
                time.sleep(0.5)
        self.client, self.worker_id = client, reg.worker_id
        set_log_context(job=reg.job or None, worker=reg.worker_id)
        client.start_session()
        older = getattr(self, "group", None)
        self.group = self._new_group()
        if older is not None:  # its abandoned groups must outlive it (dropping one blocks)
            self.group.adopt_abandoned(older)
        return reg

    def _new_group(self):
        return SoloGroup() if self.direct_client is not None else EpochGroup(self.client, self.device)

    def _reconnect(self, reason: Exception) -> None:
        """Register again with whichever master answers at the same address.

        Raises:
            MasterLost: none answered within ``reconnect_timeout_s``.
        """
        log.warning("lost the master (%s); reconnecting as %s, holding step %d (for up to %.0f s)", reason,
                    self.worker_id, self.held_step, self.reconnect_timeout_s)
        self.group.destroy()
        self.client.close()
        try:
            self._connect(self.worker_id, timeout_s=self.reconnect_timeout_s)
        except MasterUnavailable as exc:
            raise MasterLost(self.master_address, self.reconnect_timeout_s, self.held_step, exc.detail) from None

    def _loop(self, engine: StepEngine, run_dir: str) -> None:
        while True:
            try:
                if self._iterate(engine, run_dir):
                    return
            except MasterUnavailable as exc:
                self._next_plan = None
                self._emit(Event.EPOCH_JOIN)
                self._reconnect(exc)

    def _iterate(self, engine: StepEngine, run_dir: str) -> bool:
        """Run plans until told to stop (True). State survives a lost master: only
        ``held_step`` (advanced after a COMMIT) says what this worker holds."""
        client, worker_id, group = self.client, self.worker_id, self.group
        deterministic = engine.spec.deterministic
        while True:
            if self._draining and not self._left:
                self._emit(Event.PLAN_REQUESTED)  # an RPC: a wait, not local work the watchdog judges
                client.leave()
                self._left, self._next_plan = True, None
            self._emit(Event.PLAN_REQUESTED)
            plan = self._next_plan or client.plan(self.held_step, self.checkpoint_step)
            self._next_plan = None
            set_log_context(membership_epoch=plan.membership_epoch or None, step=plan.step)
            if plan.kind == "stop":
                log.info("worker %s stops: %s", worker_id, plan.stop_reason)
                return True
            if plan.kind == "wait":
                continue
            if plan.kind == "checkpoint":  # this worker holds the state: no group needed
                self._emit(Event.CHECKPOINT_START, self.held_step - 1)
                try:
                    self._checkpoint(engine, run_dir, plan, self.held_step, plan.membership_epoch)
                except StorageError as exc:  # read-only or full run dir: fatal for the job, a clean stop
                    self._report_fatal(exc)
                    return True
                self.checkpoint_step = self.held_step
                self._emit(Event.CHECKPOINT, self.held_step - 1)
                continue
            rank = plan.rank_of(worker_id)
            if plan.membership_epoch != group.epoch:
                self._emit(Event.EPOCH_JOIN, plan.step)
                try:
                    self.held_step = self._join_epoch(plan, rank, engine, group, self.held_step, run_dir)
                except RuntimeError as exc:  # a peer vanished during the rendezvous or the broadcast
                    log.warning("epoch %d could not form: %s", plan.membership_epoch, exc)
                    group.destroy()
                    try:
                        client.commit(plan.membership_epoch, plan.step, False, 0.0, {}, 0.0,
                                      error=f"epoch {plan.membership_epoch} could not form: "
                                            f"{type(exc).__name__}: {exc}"[:2000])
                    except StaleEpoch:
                        pass  # the master has moved on already: ask for the new plan
                    continue
                except VnodesError:
                    group.destroy()
                    raise

            step = plan.step
            vnodes = plan.members[rank][1]
            self._emit(Event.STEP_START, step, len(vnodes))
            t0 = time.perf_counter()
            try:
                eval_reports = None
                if plan.eval_epoch >= 0:  # the plugins' pass over this worker's shards, before the step
                    self._emit(Event.EVAL_START, step, len(vnodes))
                    eval_reports = engine.evaluate(step, vnodes)
                evaluations = None
                if plan.evaluate:  # the job's own evaluation (JobSpec.eval_dataset), with the weights of `step`
                    self._emit(Event.EVAL_START, step, len(vnodes))
                    evaluations = engine.evaluate_job(step, vnodes)
                if plan.kind == "eval":  # the pass alone (after the last step): nothing to reduce or apply
                    partial = None
                else:
                    partial = engine.compute(step, engine.loader.iterate((step, v) for v in vnodes), plan.inputs)
            except VnodesError as exc:  # NaN loss, a loss that is not per-sample...: fatal for the job
                self._report_fatal(exc)
                return True
            if self.slowdown > 1.0:
                time.sleep((time.perf_counter() - t0) * (self.slowdown - 1.0))
            compute_s = time.perf_counter() - t0
            ok, loss, total, used, metrics = True, 0.0, None, None, None
            error = ""
            if partial is not None:
                try:
                    self._emit(Event.REDUCE, step)
                    total, used = group.reduce(partial, deterministic)  # SYNC: every member of the epoch
                    loss = float(total[-1].item())
                    metrics = engine.prepare(total, used)  # the same on every member: they hold the same total
                except PeerLost as exc:  # retryable: the master aborts the step and the next epoch redoes it
                    log.warning("step %d: reduction failed (%s); reporting it", step, exc)
                    group.destroy()
                    ok, error = False, f"{type(exc).__name__}: {exc}"[:2000]
                except MasterUnavailable:
                    raise  # the loop reconnects
                except Exception as exc:  # noqa: BLE001 - a bug in the step's reduction: it would recur
                    group.destroy()  # at every attempt, so the job fails now, with the error named
                    self._report_fatal(exc)
                    return True
            self._emit(Event.REDUCED, step)
            try:
                decision, self._next_plan, evaluation = client.commit(
                    plan.membership_epoch, step, ok, loss, partial.vnode_losses if partial else {}, compute_s,
                    reports=partial.reports if partial else None, eval_reports=eval_reports,
                    metrics=metrics, evaluations=evaluations, error=error)  # SYNC: master decides
            except StaleEpoch:  # superseded and forgotten: the step did not commit here
                decision, self._next_plan, evaluation = "abort", None, None
            if decision == "commit":
                self._emit(Event.STEP_COMMITTED, step)
                if partial is not None:
                    engine.apply(total, used, metrics, evaluation)
                    self.held_step = step + 1
                elif evaluation is not None:  # the evaluation after the last step (an EVAL plan)
                    engine.evaluated(evaluation)
            else:
                self._emit(Event.STEP_ABORTED, step)

    def _report_fatal(self, exc: BaseException) -> None:
        """Tell the master the job cannot go on (it stops every worker): the error as text, never pickled."""
        self.fatal = exc
        self._emit(Event.PLAN_REQUESTED)  # reporting is an RPC: a wait
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self.client.fail(str(exc) or type(exc).__name__, type(exc).__name__, text)
        except VnodesError as report_error:  # the master is gone too: this worker's own exit says it
            log.warning("could not report %s to the master: %s", type(exc).__name__, report_error)

    def _join_epoch(self, plan: PlanView, rank: int, engine: StepEngine, group: EpochGroup,
                    held_step: int, run_dir: str) -> int:
        group.form(plan.membership_epoch, rank, len(plan.members))  # SYNC: rendezvous of every member
        source = plan.sync_source_rank
        if source >= 0:
            # On the CPU: a receiver may not have the sender's device index.
            state = group.broadcast_state(_to_cpu(engine.state_dict()) if rank == source else None, source)
            if rank != source:
                engine.load_state_dict(state)
            return plan.step
        if source == -2:
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None or ckpt.step != plan.step:
                raise VnodesError(f"the master resumes at step {plan.step} but {run_dir} holds "
                                  f"{'no checkpoint' if ckpt is None else f'step {ckpt.step}'}")
            engine.load_state_dict({"model": ckpt.model, "optimizer": ckpt.optimizer,
                                    "lr_scheduler": ckpt.lr_scheduler, "grad_scaler": ckpt.grad_scaler,
                                    "scheduler_evaluated": ckpt.scheduler_evaluated})
            return plan.step
        return held_step

    def _checkpoint(self, engine: StepEngine, run_dir: str, plan: PlanView, held_step: int,
                    membership_epoch: Optional[int]) -> None:
        """Write the job's checkpoint at ``held_step`` into the run directory.

        Raises:
            StorageError: the run directory is read-only or full (the OS error wrapped, no temporary
                file left). The caller fails the job: a clean stop, resumable once it is fixed.
        """
        ckpt = Checkpoint(step=held_step, epoch=engine.sampler.epoch_of(held_step),
                          fingerprint=engine.spec.fingerprint(), losses=list(plan.losses),
                          sampler={"steps_per_epoch": engine.sampler.steps_per_epoch, "position": held_step},
                          plugins=plan.plugin_state or {}, membership_epoch=membership_epoch or 0,
                          evaluations=list(plan.evaluations),
                          **engine.state_dict())
        save_checkpoint(run_dir, ckpt, keep=getattr(self, "keep_checkpoints", 2),
                        on_staged=lambda: self._emit(Event.CHECKPOINT_STAGED, held_step - 1))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vnodes worker", description="Join a running vnodes job.")
    add_worker_arguments(parser)
    return run_worker(parser.parse_args(argv))


EXIT_CODES_HELP = """exit codes:
  0  the master said stop: the job finished (or failed elsewhere), or this worker left (SIGTERM)
  2  this worker cannot run: bad arguments, refused by the master, the job's code or spec
     unusable here, or no master answered at start (within --connect-timeout)
  3  hung: the watchdog ended it (--hang-timeout); the job goes on without it
  4  master lost: the master went away mid-job and none answered within --master-timeout
"""


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vnodes worker`` options (and, in its ``--help``, its exit codes)."""
    parser.epilog = EXIT_CODES_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--master", required=True, metavar="HOST:PORT", help="the job's master")
    parser.add_argument("--device", help="this worker's device: cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK, else "
                        "cuda:0, if CUDA is available, else cpu); the job's device, if it names one, fixes the type")
    parser.add_argument("--token", default=os.environ.get("VNODES_TOKEN"),
                        help="shared token when the master listens beyond loopback (env VNODES_TOKEN)")
    parser.add_argument("--tls-ca", metavar="PEM", default=os.environ.get("VNODES_TLS_CA"),
                        help="trust this CA certificate and speak TLS to a master started with --tls-cert "
                             "(env VNODES_TLS_CA)")
    parser.add_argument("--launch-index", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--throughput", type=float, default=0.0,
                        help="samples/s of this device, for throughput-proportional placement")
    parser.add_argument("--hang-timeout", type=float, metavar="SECONDS", default=None,
                        help="exit (code 3, stacks on stderr) when stuck this long outside of waits on "
                             "peers or the master, so the job goes on without this worker; at least 10x "
                             "the longest local phase seen; 0: never (default: env VNODES_HANG_TIMEOUT, "
                             f"else {DEFAULT_HANG_TIMEOUT_S:.0f})")
    parser.add_argument("--master-timeout", type=float, metavar="SECONDS", default=None,
                        help="when the master is lost mid-job (killed, restarting), keep trying to reach it "
                             "this long, then exit with code 4 (default: env VNODES_MASTER_TIMEOUT, else "
                             f"{DEFAULT_MASTER_TIMEOUT_S:.0f})")
    parser.add_argument("--connect-timeout", type=float, metavar="SECONDS", default=DEFAULT_CONNECT_TIMEOUT_S,
                        help="at start, keep trying to reach the master this long, then exit with code 2 "
                             f"(default {DEFAULT_CONNECT_TIMEOUT_S:.0f})")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="test knob: stretch each step by this factor (simulates a slower device)")


def run_worker(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # a launcher's worker process (`vnodes worker` configured it already)
        level = os.environ.get("VNODES_LOG", "WARNING")
        if os.environ.get(LOG_FORMAT_ENV) == "json":  # the launcher's --log-format json
            configure_logging(level, "json")
        else:
            logging.basicConfig(level=level, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    try:
        hang_timeout = hang_timeout_from_env() if args.hang_timeout is None else args.hang_timeout
        if hang_timeout is not None and hang_timeout < 0:
            raise VnodesError(f"--hang-timeout {args.hang_timeout} is negative; use 0 to turn the watchdog off")
        master_timeout = master_timeout_from_env() if args.master_timeout is None else args.master_timeout
        if not master_timeout > 0:
            raise VnodesError(f"--master-timeout {args.master_timeout} is not a positive number of seconds")
        if not args.connect_timeout > 0:
            raise VnodesError(f"--connect-timeout {args.connect_timeout} is not a positive number of seconds")
        tls_root_cert = read_pem(args.tls_ca, "--tls-ca") if args.tls_ca else None
        agent = WorkerAgent(args.master, args.device, args.token, args.launch_index, args.throughput,
                            args.slowdown, reconnect_timeout_s=master_timeout, hang_timeout_s=hang_timeout,
                            tls_root_cert=tls_root_cert, connect_timeout_s=args.connect_timeout)
        try:
            code = agent.run()
        except MasterLost as exc:
            print(f"vnodes worker: error: {exc}", file=sys.stderr)
            code = EXIT_MASTER_LOST
        if getattr(agent, "group", None) is not None and agent.group.holds_abandoned:
            # A stopped peer's collective is still pending in an abandoned group; its finalizer
            # would hold this exit until the group timeout. This worker is done: leave now.
            log.info("exiting without finalizers: an abandoned collective is still pending")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except VnodesError as exc:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"vnodes worker: error: {exc}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
