"""The in-process transport: ``train(workers=1)`` runs the job's master and its one worker in the
caller's process and thread, with no gRPC and no sockets.

The worker agent (``runtime/agent.py``) is the one every launcher runs; here its client
(``DirectClient``) calls the ``Master`` directly instead of over the wire, and its group is a
``SoloGroup`` (nothing to reduce across processes). So plugins, the checkpoint policy, per-node
losses and the commit protocol exist once, for every mode. After each call the driver's
``Observer`` fires the callbacks (progress display included), in the same thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from vnodes.protos import Decision
from vnodes.runtime.agent import WorkerAgent
from vnodes.runtime.checkpoint import latest_checkpoint
from vnodes.runtime.events import Callback, Event, RunState, fire
from vnodes.runtime.master_client import PlanView, Registration
from vnodes.runtime.spec import JobSpec
from vnodes.runtime.train import TrainResult

from .driver import Observer
from .launcher import build_master, open_run_dir
from .master import Master, Plan, PlanKind, Report, WorkerInfo

log = logging.getLogger(__name__)


class DirectClient:
    """What ``MasterClient`` does over gRPC, as direct calls on a ``Master`` in this process."""

    def __init__(self, master: Master, spec: JobSpec, run_dir: Path, checkpoint_every: int, keep_checkpoints: int,
                 observer: Observer):
        self.master, self.spec, self.run_dir = master, spec, run_dir
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.observer = observer
        self.worker_id = ""

    def register(self, *, host: str, pid: int, device: str, device_kind: str, memory_bytes: int, throughput: float,
                 launch_index: int, worker_id: str = "", held_step: int = -1, **_) -> Registration:
        info = WorkerInfo(worker_id=worker_id, host=host, pid=pid, device=device, device_kind=device_kind,
                          memory_bytes=memory_bytes, throughput=throughput, launch_index=launch_index,
                          held_step=held_step)
        self.worker_id = self.master.register(info)
        return Registration(self.worker_id, b"", str(self.run_dir), self.checkpoint_every, info.session_key, None,
                            spec=self.spec, keep_checkpoints=self.keep_checkpoints)

    def start_session(self) -> None:
        """Nothing to keep alive: master and worker live and die together."""

    def plan(self, held_step: int, checkpoint_step: int) -> PlanView:
        plan = self.master.plan(self.worker_id, held_step, checkpoint_step)
        self.observer.poll()
        return self._view(plan)

    def commit(self, epoch: int, step: int, ok: bool, loss: float, vnode_losses: dict[int, float],
               step_time_s: float, timeout_s: Optional[float] = None, reports=None,
               eval_reports=None, metrics=None, evaluations=None,
               error: str = "") -> tuple[str, Optional[PlanView], Optional[dict]]:
        report = Report(ok, loss, dict(vnode_losses), step_time_s, reports or {}, eval_reports or {},
                        evaluations=dict(evaluations or {}), error=error)
        if metrics is not None:
            report.grad_norm, report.skipped, report.lr = metrics.grad_norm, metrics.skipped, metrics.lr
            report.train_metrics = dict(metrics.values)
        self.master.submit(self.worker_id, epoch, step, report, on_decided=_nothing)  # the only member: decided
        decision, next_plan = self.master.outcome(self.worker_id, epoch, step, want_next=True)
        self.observer.poll()
        evaluation = self.master.evaluation_of(step) if decision == Decision.COMMIT else None
        return decision, self._view(next_plan) if next_plan is not None else None, evaluation

    def leave(self) -> None:
        self.master.leave(self.worker_id)

    def fail(self, message: str, error_type: str, traceback: str) -> None:
        self.master.fail(self.worker_id, message, error_type, traceback)

    def close(self) -> None:
        pass

    def _view(self, plan: Plan) -> PlanView:
        m = plan.membership
        members = [(w, list(v)) for w, v in zip(m.members, m.vnodes)] if m is not None else []
        losses = list(self.master.losses[:plan.step]) if plan.kind == PlanKind.CHECKPOINT else []
        return PlanView(plan.kind, m.epoch if m is not None else 0, plan.step, members,
                        m.sync_source_rank if m is not None else -1, plan.stop_reason, losses, plan.eval_epoch,
                        plan.inputs, plan.plugin_state, plan.evaluate,
                        [e for e in self.master.evaluations if e["step"] <= plan.step]
                        if plan.kind == PlanKind.CHECKPOINT else [])


def _nothing() -> None:
    pass


def train_in_process(spec: JobSpec, steps: int, checkpoint_dir: Optional[Path], checkpoint_every: Optional[int],
                     callbacks: Sequence[Callback] = (), keep_checkpoints: int = 2) -> TrainResult:
    """``train(workers=1)``: the master and the job's one worker in this thread.

    Raises:
        whatever the job raised (``NonFiniteLoss``, ``JobCodeError``, ``StorageError``...), as it
        was raised.
    """
    with contextlib.ExitStack() as stack:
        run_dir = open_run_dir(stack, checkpoint_dir)
        master = build_master(spec, steps, run_dir, checkpoint_every=checkpoint_every or 0, expected_workers=1,
                              start_grace_s=0.0, await_holders=False, durable=False)
        start = master.step
        if start > steps:
            log.warning("checkpoint is at step %d, past steps=%d; returning it unchanged", start, steps)
        state = RunState(step=start, steps=steps, start_step=start, samples_per_step=spec.global_batch_size)
        observer = Observer(master, callbacks, state, run_dir)
        client = DirectClient(master, spec, run_dir, checkpoint_every or 0, keep_checkpoints, observer)
        agent = WorkerAgent("in-process", direct_client=client)
        fire(observer.callbacks, Event.FIT_START, state)
        t0 = time.perf_counter()
        try:
            agent.run()
        finally:
            observer.poll()
            fire(observer.callbacks, Event.FIT_END, state)
            if master.host is not None:
                master.host.on_fit_end()
            if master.metrics is not None:
                master.metrics.close()
        wall = time.perf_counter() - t0
        if agent.fatal is not None:
            raise agent.fatal
        if agent.engine is not None and agent.held_step == master.step:
            model_state = {k: v.detach().cpu().clone() for k, v in agent.engine.model.state_dict().items()}
        else:  # nothing ran here (the run directory holds the result already)
            ckpt = latest_checkpoint(run_dir)
            model_state = dict(ckpt.model) if ckpt is not None else {}
        done = max(0, steps - start)
        return TrainResult(model_state_dict=model_state, losses=list(master.losses), steps=max(start, steps),
                           evaluations=list(master.evaluations),
                           checkpoint_dir=str(run_dir) if checkpoint_dir is not None else None, wall_time_s=wall,
                           samples_per_s=done * spec.global_batch_size / wall if wall > 0 else 0.0)
