"""The per-job master: membership, liveness, placement and the step commit protocol.

All state lives in one ``Master`` object guarded by one lock; every public method is one event
(``register``, ``plan``, ``commit``, ``lost``...). Decisions (who is a member, which VNs each gets)
are made by pure functions in ``placement.py``; ``_reform`` is the one place that changes the
membership. The gRPC servicer only converts messages and calls these methods, so the master can be
stepped one event at a time in tests, with an injectable clock.

A step, seen from here::

    plan(e, s) -> every member computes its VNs, reduces over the epoch-e process group
    commit(e, s, ok) from every member  -> COMMIT: step = s + 1 (each member applies)
    a member lost, or a report not ok   -> ABORT:  re-form epoch e + 1, redo s

Plugins (``plugins/host.py``): at ``Event.PLAN`` a RUN plan gets the mutators' per-sample inputs
for the member's nodes and, at the first step of an epoch, the request for the evaluation pass of
the epoch before (an EVAL plan after the last step); at ``Event.STEP_COMMITTED`` the host consumes the
members' reports; a CHECKPOINT plan carries the plugins' state; a roll-back to a checkpoint restores it.

Membership changes (joins, leaves, deaths) take effect only at a step boundary: after a commit, or
after an abort. A member's ``held_step`` is the step whose state it holds; a new epoch whose
members do not all hold the current step names a ``sync_source_rank`` that broadcasts its state.

The end of a job: DONE (or FAILED) is told to each worker as a STOP plan; a worker closes its session
only once it has heard it (or it crashed). ``outstanding()`` lists the workers that may still be
running the job, including those of a previous master of the same run directory that have not come
back yet (the durable roster, ``durable.py``: who may still run the job, and who was told STOP);
whoever serves the master keeps serving until that list is empty, within a bound
(``launcher.MasterHandle.wait_for_end``), so that every worker ends with exit code 0 however its
reconnects and the end interleave. A previous master's worker is waited for until the start grace
period ends, or, if it had been told STOP already (its reply may have been lost with that master),
for ``heartbeat_timeout_s``: a worker that heard nothing retries at once.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hmac
import math
import os
import secrets
import threading
import time
import uuid
from typing import Callable, Optional, Sequence

from vnodes.runtime.errors import StorageError, VnodesError
from vnodes.runtime.plugins import SampleColumns

from vnodes.protos import SYNC_FROM_CHECKPOINT, SYNC_NONE, Decision, PlanKind
from vnodes.runtime.logs import set_log_context

from . import placement
from .durable import DurableState
from .errors import BadRequest, DuplicateRegistration, NotYourRegistration, StaleEpoch, TooManyWorkers, UnknownWorker

COMMITTED_KEPT = 4096  # committed steps kept for observers that poll (progress, callbacks)
MAX_LIVE_WORKERS = 4096  # registrations not yet dead or left; more are refused (a bounded table)
DEPARTED_KEPT = 256  # dead or left registrations remembered (for Status and re-registration)
MAX_STEP_ATTEMPTS_ENV = "VNODES_MAX_STEP_ATTEMPTS"
DEFAULT_MAX_STEP_ATTEMPTS = 20  # aborts of one step in a row before the job fails


# Why a step was aborted (``Master.aborted_by_cause``): a member's session ended (crash, kill, drain
# cut short), its heartbeats stopped, it did not commit after its peers did, or a reduction failed.
ABORT_CAUSES = ("worker_lost", "heartbeat_timeout", "commit_timeout", "reduce_failed")


def max_step_attempts_from_env() -> int:
    """``VNODES_MAX_STEP_ATTEMPTS``, else ``DEFAULT_MAX_STEP_ATTEMPTS``.

    Raises:
        VnodesError: the variable is not an integer >= 1.
    """
    text = os.environ.get(MAX_STEP_ATTEMPTS_ENV, "")
    if not text:
        return DEFAULT_MAX_STEP_ATTEMPTS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise VnodesError(f"{MAX_STEP_ATTEMPTS_ENV}={text!r} must be an integer >= 1 (aborts of one step in a "
                          f"row before the job fails; default {DEFAULT_MAX_STEP_ATTEMPTS})")
    return value


class WorkerState(str, enum.Enum):
    """A worker's lifecycle as the master sees it::

        REGISTERED --(first plan request: engine built)--> READY --(re-form)--> MEMBER
        READY/MEMBER --(leave)--> LEAVING --(next boundary)--> LEFT
        any --(stream broken, heartbeats missed)--> DEAD
    """

    REGISTERED = "registered"
    READY = "ready"
    MEMBER = "member"
    LEAVING = "leaving"
    LEFT = "left"
    DEAD = "dead"


class JobState(str, enum.Enum):
    """WAITING (for workers) <-> RUNNING -> DONE | FAILED."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclasses.dataclass
class WorkerInfo:
    worker_id: str
    host: str = ""
    pid: int = 0
    device: str = "cpu"
    device_kind: str = "cpu"
    memory_bytes: int = 0
    throughput: float = 0.0
    launch_index: int = -1
    state: WorkerState = WorkerState.REGISTERED
    held_step: int = -1
    last_seen_s: float = 0.0
    step_time_s: float = 0.0
    vnode_rate: float = 0.0  # measured virtual nodes per second of compute (EMA); 0: not measured yet
    joined_order: int = 0  # which registration this is (a re-registration under the same id gets a new one)
    session_key: str = dataclasses.field(default="", repr=False)  # this registration's secret (set by register)
    # Its session ended or it was declared dead: it no longer runs this job (a LEFT worker stays LEFT).
    gone: bool = False
    told_stop: bool = False  # a STOP plan was handed out to it (the job ended, failed, or it left)


@dataclasses.dataclass(frozen=True)
class JobFailure:
    """Why a job failed, as plain fields (a worker's error crosses the wire as text, never pickled)."""

    message: str
    error_type: str = ""  # the exception's class name on the worker, e.g. "NonFiniteLoss"
    traceback: str = ""
    worker_id: str = ""  # "" : decided by the master itself


@dataclasses.dataclass(frozen=True)
class Membership:
    """One membership epoch: who computes which virtual nodes, in rank order."""

    epoch: int
    step: int  # the step this epoch started at
    members: tuple[str, ...]  # index = worker_rank (changes on every re-form; vnode_id never does)
    vnodes: tuple[tuple[int, ...], ...]  # per rank
    sync_source_rank: int

    def rank_of(self, worker_id: str) -> int:
        return self._ranks[worker_id]

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._ranks

    @functools.cached_property
    def _ranks(self) -> dict[str, int]:  # O(1) lookups: every commit of every member asks
        return {w: r for r, w in enumerate(self.members)}


@dataclasses.dataclass(frozen=True)
class Plan:
    kind: PlanKind
    membership: Optional[Membership] = None
    step: int = 0
    stop_reason: str = ""
    eval_epoch: int = -1  # >= 0: the plugins' evaluation pass of that data epoch runs first (RUN) or alone (EVAL)
    inputs: dict[str, SampleColumns] = dataclasses.field(default_factory=dict)  # mutators' inputs for this worker
    plugin_state: Optional[dict] = None  # CHECKPOINT: the plugins' state at ``step``, for the checkpoint
    evaluate: bool = False  # the job's evaluation (JobSpec.eval_dataset) runs first (RUN) or alone (EVAL)


@dataclasses.dataclass
class Report:
    ok: bool
    loss: float
    vnode_losses: dict[int, float]
    step_time_s: float
    reports: dict[str, SampleColumns] = dataclasses.field(default_factory=dict)  # plugin name -> its report
    eval_reports: dict[str, SampleColumns] = dataclasses.field(default_factory=dict)  # of the evaluation pass
    grad_norm: float = math.nan  # of the reduced gradient (StepEngine.prepare); nan: not reported
    skipped: bool = False  # fp16 overflow: the step commits without an optimizer step
    lr: float = math.nan
    evaluations: dict[int, tuple[int, dict[str, float]]] = dataclasses.field(default_factory=dict)  # vnode -> (count, sums)
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # step_fn's metrics, means over the nodes
    error: str = ""  # ok=False: why the worker's reduction failed


@dataclasses.dataclass
class CommittedStep:
    """Observers (progress, plugins) see every committed step once."""

    step: int
    loss: float
    vnode_losses: dict[int, float]
    step_time_s: float
    membership_epoch: int
    committed_at_s: float  # master clock
    grad_norm: float = math.nan
    skipped: bool = False
    lr: float = math.nan
    evaluation: Optional[dict] = None  # {"step": s, metric: mean, ...} when the job's evaluation ran with this step
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # step_fn's metrics (Report.train_metrics)


class Master:
    """The state of one job. Thread-safe; blocking methods wait on one condition variable."""

    def __init__(self, virtual_nodes: int, steps: int, *, start_step: int = 0, losses: Optional[list] = None,
                 checkpoint_every: int = 0, checkpoint_step: int = -1, expected_workers: int = 1,
                 steps_per_epoch: int = 0, vnode_batch_size: int = 1, rebalance_every: int = 3,
                 start_grace_s: float = 30.0, heartbeat_timeout_s: float = 10.0, placement_policy: str = "throughput",
                 can_resume_from_checkpoint: Callable[[], Optional[int]] = lambda: None,
                 durable: Optional[DurableState] = None, restored: bool = False, epoch_counter: int = 0,
                 awaited: Optional[Sequence[str]] = None, awaited_told: Sequence[str] = (),
                 on_epoch_superseded: Callable[[int], None] = lambda epoch: None,
                 host=None, plugin_state_at: Callable[[int], Optional[dict]] = lambda step: None,
                 clock: Callable[[], float] = time.monotonic, metrics=None, eval_every: int = -1,
                 evaluations: Optional[list[dict]] = None, max_step_attempts: Optional[int] = None):
        """``awaited``: the workers of a previous master of this run directory that may still run the
        job (its durable roster): they reconnect, and are waited for until the start grace period
        ends (``start_grace_s``), to resume with the state they hold and to hear the job's end;
        those also in ``awaited_told`` had been told STOP: they are waited for ``heartbeat_timeout_s``.
        ``None``: not known (a run directory written by an older version).

        ``host``: the job's plugins (``plugins.PluginHost``), already at the state of ``start_step``;
        ``plugin_state_at(step)`` reads their state from the checkpoint of ``step`` (a roll-back)."""
        self.virtual_nodes = virtual_nodes
        self.steps = steps
        self.step = start_step  # committed steps == the next step to run
        self.losses: list[float] = list(losses or [])
        self.checkpoint_every = checkpoint_every
        self.steps_per_epoch = steps_per_epoch
        self.vnode_batch_size = vnode_batch_size
        self.rebalance_every = rebalance_every  # steps measured in an epoch before re-placing by speed
        self._next_counts: Optional[list[int]] = None
        self.checkpoint_step = checkpoint_step  # step of the newest checkpoint written for this job
        self.expected_workers = expected_workers
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_step_attempts = max_step_attempts if max_step_attempts is not None else max_step_attempts_from_env()
        self._aborts: tuple[int, int] = (-1, 0)  # (step, its aborted attempts in a row)
        self.last_abort: Optional[dict] = None  # the latest aborted step and why (Status)
        self.aborted = 0  # aborted steps since this master started
        self.aborted_by_cause: collections.Counter = collections.Counter()  # ABORT_CAUSES -> count
        # Where the master's time goes (the Prometheus endpoint): name -> [count, total seconds].
        self.timings: dict[str, list] = {"plugins": [0, 0.0], "checkpoint": [0, 0.0]}
        self._checkpoint_asked_s: dict[int, float] = {}  # step -> when its CHECKPOINT plan was first handed out
        self.placement_policy = placement_policy
        self._checkpoint_step_on_disk = can_resume_from_checkpoint
        self.clock = clock
        self.start_deadline_s = clock() + start_grace_s
        self.told_deadline_s = clock() + heartbeat_timeout_s  # for awaited workers told STOP already

        self.workers: dict[str, WorkerInfo] = {}
        self.membership: Optional[Membership] = None
        self.epoch_counter = epoch_counter
        self.durable = durable  # None: state in memory only
        self.metrics = metrics  # metrics_stream.MetricsStream, or None
        # The job's evaluation: every eval_every steps and after the last (-1: never); the results.
        self.eval_every = eval_every
        self.evaluations: list[dict] = [e for e in (evaluations or []) if e["step"] <= start_step]
        self.host = host
        self._plugin_state_at = plugin_state_at
        self._plugin_snapshots: dict[int, dict] = {}  # step -> the plugins' state handed out for its checkpoint
        # Tells members still waiting to rendezvous in an old epoch to give up (see collectives.py).
        self.on_epoch_superseded = on_epoch_superseded
        # Restarted from durable state: the last commit may have reached no worker (all hold step-1).
        self._restored = restored
        self.state = JobState.WAITING
        self.failure: Optional[JobFailure] = None
        self._arrived: tuple[int, set[str]] = (0, set())  # (epoch, members at its rendezvous so far)
        self.reports: dict[str, Report] = {}  # for (membership.epoch, self.step)
        self.decisions: dict[tuple[int, int], Decision] = {}
        self._callbacks: dict[tuple[int, int], list[Callable[[], None]]] = {}
        # The newest committed steps, for observers; bounded, so a job of millions of steps does not
        # keep every step's per-VN losses. ``committed_count`` counts them all.
        self.committed: collections.deque[CommittedStep] = collections.deque(maxlen=COMMITTED_KEPT)
        self.committed_count = 0
        self._needs_reform = True
        self._in_flight: Optional[tuple[int, int]] = None  # (epoch, step) handed out, maybe undecided
        self._joined = 0
        self._cond = threading.Condition()
        # The previous master's workers not registered here yet -> whether they were told STOP (None:
        # unknown, see the docstring).
        self._awaited: Optional[dict[str, bool]] = (None if awaited is None else
                                                    {w: w in set(awaited_told) for w in awaited})
        if self._finished():  # a master restarted after the end: nothing to run, only workers to tell
            self.state = JobState.DONE

    # -- events ----------------------------------------------------------------------------------

    def register(self, info: WorkerInfo) -> str:
        """A worker joins (it becomes a member at the next step boundary). Sets ``info.session_key``,
        the secret that every later request of this registration must carry (``authenticate``).

        Raises:
            DuplicateRegistration: ``info.worker_id`` is registered and alive.
            TooManyWorkers: the table of live registrations is full.
        """
        with self._cond:
            if info.worker_id:
                old = self.workers.get(info.worker_id)
                if old is not None and old.state not in (WorkerState.DEAD, WorkerState.LEFT):
                    raise DuplicateRegistration(info.worker_id)
            else:
                info.worker_id = uuid.uuid4().hex[:12]
            self._prune_departed()
            live = sum(w.state not in (WorkerState.DEAD, WorkerState.LEFT) for w in self.workers.values())
            if live >= MAX_LIVE_WORKERS:
                raise TooManyWorkers(MAX_LIVE_WORKERS)
            if self._awaited:
                self._awaited.pop(info.worker_id, None)
            self._joined += 1
            info.joined_order = self._joined
            info.session_key = secrets.token_hex(16)
            info.state = WorkerState.REGISTERED
            info.last_seen_s = self.clock()
            self.workers.pop(info.worker_id, None)  # re-inserted last: the table stays in joining order
            self.workers[info.worker_id] = info
            self._cond.notify_all()
            return info.worker_id

    def authenticate(self, worker_id: str, session_key: str) -> int:
        """The registration (``joined_order``) that ``session_key`` proves to be, for ``worker_id``.

        Raises:
            UnknownWorker: no such worker, or it was declared dead (e.g. this master restarted, or
                missed heartbeats: register again).
            NotYourRegistration: the key is not that of the worker's current registration.
        """
        with self._cond:
            info = self._get(worker_id)
            if not session_key or not hmac.compare_digest(session_key.encode(), info.session_key.encode()):
                raise NotYourRegistration(worker_id)
            if info.state == WorkerState.DEAD:  # its key died with it: a live worker registers again
                raise UnknownWorker(worker_id)
            return info.joined_order

    def _prune_departed(self) -> None:
        """Forget the oldest dead or left registrations beyond ``DEPARTED_KEPT`` (never a member of
        the current epoch: its commit bookkeeping still reads it)."""
        departed = [w for w in self.workers.values() if w.state in (WorkerState.DEAD, WorkerState.LEFT)
                    and (self.membership is None or w.worker_id not in self.membership)]
        for w in departed[:max(0, len(departed) - DEPARTED_KEPT)]:
            del self.workers[w.worker_id]

    def heartbeat(self, worker_id: str, registration: Optional[int] = None) -> int:
        """A sign of life from ``registration`` of ``worker_id`` (None: the current one, which a new
        session stream binds to). Returns that registration (``joined_order``); one naming an older
        registration of the same id (a stale session stream) counts for nothing."""
        with self._cond:
            info = self._get(worker_id)
            if registration is None or registration == info.joined_order:
                info.last_seen_s = self.clock()
            return info.joined_order if registration is None else registration

    def lost(self, worker_id: str, reason: str, registration: Optional[int] = None,
             cause: str = "worker_lost") -> None:
        """A worker is gone (broken stream, missed heartbeats). A member's loss aborts the step.

        With ``registration``, only that registration of ``worker_id`` is lost: the end of a session
        stream that outlived a re-registration must not kill the new one.
        """
        if registration is not None:
            with self._cond:
                info = self.workers.get(worker_id)
                if info is None or info.joined_order != registration:
                    return
                self._lose([worker_id], reason, cause)  # the lock is re-entrant: one decision
            return
        self._lose([worker_id], reason, cause)

    def _lose(self, worker_ids: list[str], reason: str, cause: str = "worker_lost") -> None:
        """Declare these workers dead at once: one abort and one re-form, however many they are."""
        with self._cond:
            members_lost, newly_gone = False, False
            for worker_id in worker_ids:
                info = self.workers.get(worker_id)
                if info is None:
                    continue
                newly_gone = newly_gone or not info.gone
                info.gone = True  # a LEFT worker too: its session ended
                if info.state in (WorkerState.DEAD, WorkerState.LEFT):
                    continue
                was_member = self.membership is not None and worker_id in self.membership
                info.state = WorkerState.DEAD
                members_lost = members_lost or was_member
                self._needs_reform = self._needs_reform or not was_member
            if members_lost and self.state == JobState.RUNNING:
                self._abort_current(f"lost {', '.join(worker_ids)}: {reason}", cause)
                self._reform()  # at a boundary now: the survivors (or nobody: WAITING) form the next epoch
            if newly_gone and self.done:
                self._persist()  # the roster shrinks: a master restarted now need not wait for them
            self._cond.notify_all()

    def leave(self, worker_id: str) -> None:
        """Graceful exit (SIGTERM drain): the worker leaves at the next step boundary."""
        with self._cond:
            info = self._get(worker_id)
            info.state = WorkerState.LEAVING if info.state == WorkerState.MEMBER else WorkerState.LEFT
            self._needs_reform = True
            self._cond.notify_all()

    def fail(self, worker_id: str, message: str, error_type: str = "", traceback: str = "") -> None:
        """A fatal error of the job (e.g. a NaN loss): every worker is told to stop."""
        with self._cond:
            if self.state not in (JobState.DONE, JobState.FAILED):
                self.state = JobState.FAILED
                self.failure = JobFailure(message, error_type, traceback, worker_id)
                if self.membership is not None:
                    self._decide((self.membership.epoch, self.step), Decision.ABORT)
            self._cond.notify_all()

    def check_liveness(self) -> None:
        """Declare dead the workers whose heartbeats stopped (hung, not crashed)."""
        now = self.clock()
        with self._cond:
            stale = [w.worker_id for w in self.workers.values()
                     if w.state in (WorkerState.REGISTERED, WorkerState.READY, WorkerState.MEMBER, WorkerState.LEAVING)
                     and now - w.last_seen_s > self.heartbeat_timeout_s]
        for worker_id in stale:
            self.lost(worker_id, f"no heartbeat for {self.heartbeat_timeout_s:.0f} s", cause="heartbeat_timeout")
        with self._cond:
            self._cond.notify_all()  # a start grace period may have ended

    # -- plans and commits -----------------------------------------------------------------------

    def plan(self, worker_id: str, held_step: int, checkpoint_step: int = -1, timeout_s: float = 5.0) -> Plan:
        """What ``worker_id`` does next; blocks up to ``timeout_s`` while the answer is WAIT."""
        deadline = self.clock() + timeout_s
        with self._cond:
            info = self._get(worker_id)
            if info.state == WorkerState.DEAD:
                raise UnknownWorker(worker_id)
            if checkpoint_step > self.step:
                raise BadRequest(f"checkpoint_step {checkpoint_step} is past the job's committed step {self.step}: "
                                 "a worker can only have checkpointed a committed step")
            info.held_step = held_step
            info.last_seen_s = self.clock()
            if checkpoint_step > self.checkpoint_step:
                asked = self._checkpoint_asked_s.pop(checkpoint_step, None)
                if asked is not None:
                    self._time("checkpoint", self.clock() - asked)
                self.checkpoint_step = checkpoint_step
                self._persist()
                self._cond.notify_all()
            if info.state == WorkerState.REGISTERED:
                info.state = WorkerState.READY
                self._needs_reform = True
                self._cond.notify_all()
            while True:
                plan = self._plan_for(info)
                if plan.kind == PlanKind.STOP and not info.told_stop:
                    info.told_stop = True
                    self._persist()  # a master restarted from here on waits only briefly for this one
                if plan.kind != PlanKind.WAIT or self.clock() >= deadline:
                    return plan
                self._cond.wait(timeout=max(0.01, min(0.5, deadline - self.clock())))

    def submit(self, worker_id: str, epoch: int, step: int, report: Report,
               on_decided: Callable[[], None], registration: Optional[int] = None) -> None:
        """Record a member's reduced step (non-blocking); ``on_decided`` runs once the step
        is decided (at once if it already is), on whichever thread decides it, with the master's
        lock held: keep it tiny (e.g. ``loop.call_soon_threadsafe``). ``outcome`` then tells how.
        With ``registration`` (what a session stream is bound to), a report of an older registration
        of ``worker_id`` (a stale stream) is refused.
        """
        key = (epoch, step)
        with self._cond:
            info = self._get(worker_id)
            if registration is not None and registration != info.joined_order:
                raise BadRequest(f"this session stream speaks for registration {registration} of worker "
                                 f"{worker_id}, which has registered again since (registration "
                                 f"{info.joined_order}): its report does not count")
            if self.membership is None or epoch != self.membership.epoch:
                current = self.membership.epoch if self.membership else self.epoch_counter
                if key not in self.decisions:
                    raise StaleEpoch(epoch, current)
            elif worker_id not in self.membership:
                raise BadRequest(f"worker {worker_id} is not a member of epoch {epoch}")
            elif step != self.step and key not in self.decisions:
                raise BadRequest(f"commit for step {step}, but the job is at step {self.step}")
            elif self.host is None and (report.reports or report.eval_reports):
                raise BadRequest(f"worker {worker_id} sent plugin reports, but this job has no plugins")
            elif self.host is not None and not self.host.names.issuperset({*report.reports, *report.eval_reports}):
                raise BadRequest(f"worker {worker_id} sent reports of plugins {sorted({*report.reports, *report.eval_reports})}; "
                                 f"this job has {sorted(self.host.names)}")
            elif report.vnode_losses and sorted(report.vnode_losses) != list(self._vnodes_of(worker_id)):
                raise BadRequest(f"worker {worker_id} reported virtual nodes {sorted(report.vnode_losses)} for step "
                                 f"{step}, but epoch {epoch} gave it {list(self._vnodes_of(worker_id))}")
            elif key not in self.decisions:
                info.step_time_s = report.step_time_s
                self.reports[worker_id] = report
                self._callbacks.setdefault(key, []).append(on_decided)
                on_decided = None
                if not report.ok:
                    self._abort_current(f"worker {worker_id} could not reduce step {step}"
                                        + (f": {report.error}" if report.error else ""), "reduce_failed")
                elif len(self.reports) == len(self.membership.members):
                    self._commit_current()
        if on_decided is not None:  # decided before this report arrived
            on_decided()

    def evaluation_of(self, step: int) -> Optional[dict]:
        """The job's evaluation of the weights of ``step`` (None if there is none), sent with the
        decision on ``step``: a scheduler that steps on it steps once, wherever the state came from
        (``StepEngine.evaluated``), also when the evaluation was recorded before a resume."""
        with self._cond:
            return next((e for e in reversed(self.evaluations) if e["step"] == step), None)

    def outcome(self, worker_id: str, epoch: int, step: int, want_next: bool) -> tuple[Decision, Optional[Plan]]:
        """The decision of a decided step, and (with ``want_next``, on COMMIT) the worker's next plan."""
        with self._cond:
            info = self._get(worker_id)
            decision = self.decisions.get((epoch, step))
            if decision is None:
                raise BadRequest(f"step {step} of epoch {epoch} is not decided (or too old to remember)")
            if decision != Decision.COMMIT or not want_next or info.state == WorkerState.DEAD:
                return decision, None
            if step < self.steps:  # a training step (an EVAL plan's commit applies nothing)
                info.held_step = step + 1
            plan = self._plan_for(info)
            return decision, plan if plan.kind == PlanKind.RUN else None

    def expire(self, epoch: int, step: int, waited_s: float) -> list[str]:
        """Step ``step`` of ``epoch`` has had reports for ``waited_s`` seconds but not from every
        member. After a successful reduce all members commit within moments, so the silent ones are
        stuck (hung after the reduce): they are declared lost, which aborts the step and re-forms
        the epoch without them. Returns their ids (none if the step is decided or not current)."""
        with self._cond:  # one critical section: nothing changes between the judgement and the verdict
            m = self.membership
            if m is None or m.epoch != epoch or step != self.step or (epoch, step) in self.decisions \
                    or not self.reports:
                return []
            silent = [w for w in m.members if w not in self.reports]
            self._lose(silent, f"no commit for step {step} {waited_s:.0f} s after their peers committed",
                       "commit_timeout")
            return silent

    def epoch_status(self, worker_id: str, epoch: int, arrive: bool) -> tuple[bool, int]:
        """``(superseded, arrived)`` of membership epoch ``epoch``'s rendezvous. ``arrive`` counts
        ``worker_id`` (a member of it) as arrived. Superseded: the master formed a newer epoch or the
        job ended, so whoever still waits on this epoch's peers must leave.

        Raises:
            UnknownWorker: no such worker.
            BadRequest: ``arrive`` from a worker that is not a member of ``epoch``.
        """
        with self._cond:
            info = self._get(worker_id)
            info.last_seen_s = self.clock()
            m = self.membership
            superseded = m is None or m.epoch != epoch or self.done
            if superseded:  # a question about another epoch must not erase the current one's count
                return True, len(self._arrived[1]) if self._arrived[0] == epoch else 0
            if self._arrived[0] != epoch:
                self._arrived = (epoch, set())
            if arrive:
                if worker_id not in m:
                    raise BadRequest(f"worker {worker_id} is not a member of epoch {epoch}")
                self._arrived[1].add(worker_id)
            return False, len(self._arrived[1])

    def may_rendezvous(self, worker_id: str, epoch: int) -> bool:
        """Whether ``worker_id`` may use membership epoch ``epoch``'s rendezvous keys now: True for a
        member of the current epoch, False for any epoch already superseded (its keys are gone; the
        worker learns it from ``epoch_status``).

        Raises:
            BadRequest: a newer epoch than the current one, or the current one by a non-member.
        """
        with self._cond:
            current = self.membership.epoch if self.membership is not None else self.epoch_counter
            if epoch < current or (epoch == current and self.membership is None):
                return False
            if epoch > current:
                raise BadRequest(f"membership epoch {epoch} does not exist yet (the current one is {current})")
            if worker_id not in self.membership:
                raise BadRequest(f"worker {worker_id} is not a member of epoch {epoch}: only its members "
                                 "use its rendezvous keys")
            return True

    def is_decided(self, epoch: int, step: int) -> bool:
        with self._cond:
            return (epoch, step) in self.decisions

    def committed_since(self, count: int) -> tuple[list[CommittedStep], int]:
        """The steps committed after the first ``count``, and the count to pass next time. Only the
        newest ``COMMITTED_KEPT`` are kept, so an observer further behind misses the oldest."""
        with self._cond:
            new = self.committed_count - count
            return (list(self.committed)[-new:] if new > 0 else []), self.committed_count

    def wait(self, predicate: Callable[["Master"], bool], timeout_s: float) -> bool:
        deadline = self.clock() + timeout_s
        with self._cond:
            while not predicate(self):
                if self.clock() >= deadline:
                    return False
                self._cond.wait(timeout=0.2)
            return True

    def data_epoch(self, step: int) -> int:
        return step // self.steps_per_epoch if self.steps_per_epoch else 0

    @property
    def done(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED)

    def outstanding(self) -> list[str]:
        """The workers that may still be running this job: those registered here whose session is
        open (a worker closes it only once told to stop, or when it crashes; a hung one is declared
        dead after ``heartbeat_timeout_s``), and those of the previous master (``awaited``) that
        have not registered here again, until the start grace period ends. Empty once the job is
        done: every worker has heard the end or is gone."""
        with self._cond:
            return self._outstanding()

    def start_grace_left_s(self) -> float:
        """Seconds left of the start grace period (0 once it ended)."""
        return max(0.0, self.start_deadline_s - self.clock())

    # -- internals (lock held) -------------------------------------------------------------------

    def _get(self, worker_id: str) -> WorkerInfo:
        info = self.workers.get(worker_id)
        if info is None:
            raise UnknownWorker(worker_id)
        return info

    def _vnodes_of(self, worker_id: str) -> tuple[int, ...]:
        return self.membership.vnodes[self.membership.rank_of(worker_id)]

    def _outstanding(self) -> list[str]:
        return list(self._roster())

    def _roster(self) -> dict[str, bool]:
        """The workers that may still run the job (``outstanding``) -> whether they were told STOP."""
        roster = {w.worker_id: w.told_stop for w in self.workers.values() if not w.gone}
        now = self.clock()
        for worker_id, told in sorted((self._awaited or {}).items()):
            if now < (self.told_deadline_s if told else self.start_deadline_s):
                roster.setdefault(worker_id, told)
        return roster

    def _finished(self) -> bool:
        """Every step is committed and the final checkpoint written (what ``_plan_for`` ends on)."""
        return self.step >= self.steps and self.step <= max(self.checkpoint_step, 0)

    def _persist(self) -> None:
        """Record the committed state in the run directory, with the workers that may still run the
        job (``outstanding``: a restarted master waits for them). A write that fails (read-only or
        full) fails the job cleanly: every worker is told to stop and the master's caller reports the
        directory, the OS error and the fix. Going on would commit steps a restarted master cannot know."""
        if self.durable is None:
            return
        try:
            roster = self._roster()
            self.durable.save(self.step, self.epoch_counter, self.checkpoint_step, self.losses,
                              workers=list(roster), told=[w for w, told in roster.items() if told],
                              evaluations=self.evaluations)
        except StorageError as exc:
            self.fail("", str(exc), type(exc).__name__)

    def _decide(self, key: tuple[int, int], decision: Decision) -> None:
        self.decisions.setdefault(key, decision)
        for callback in self._callbacks.pop(key, ()):
            callback()
        self._cond.notify_all()

    def _commit_current(self) -> None:
        m = self.membership
        reports = [self.reports[w] for w in m.members]
        if self.host is not None and (self.step < self.steps or self.host.eval_due(self.step) >= 0) \
                and not self._feed_plugins(m, reports):
            return
        try:
            evaluation = self._record_evaluation(m, reports)
        except BadRequest as exc:
            self.fail("", str(exc), "BadRequest")
            return
        if self.step >= self.steps:  # the last evaluation pass alone (an EVAL plan): no step to apply
            self._decide((m.epoch, self.step), Decision.COMMIT)
            self.reports = {}
            if evaluation is not None:
                self._persist()
            return
        vnode_losses: dict[int, float] = {}
        for r in reports:
            vnode_losses.update(r.vnode_losses)
        self._decide((m.epoch, self.step), Decision.COMMIT)
        self.committed_count += 1
        self._aborts = (-1, 0)
        first = reports[0]
        self.committed.append(CommittedStep(self.step, first.loss, vnode_losses, max(r.step_time_s for r in reports),
                                            m.epoch, self.clock(), first.grad_norm, first.skipped, first.lr,
                                            evaluation, dict(first.train_metrics)))
        self.losses.append(reports[0].loss)
        if self.metrics is not None:
            c = self.committed[-1]
            self.metrics.step(c.step, c.loss, list(vnode_losses.values()), c.step_time_s, len(m.members), m.epoch,
                              c.grad_norm, c.skipped, c.lr, time.time(), c.metrics)
        self.step += 1
        set_log_context(step=self.step)
        self.reports = {}
        self._persist()
        for old in [k for k in self.decisions if k[1] < self.step - 8]:  # late callers of old steps: rare
            self.decisions.pop(old, None)
            self._callbacks.pop(old, None)
        for w, vnodes, r in zip(m.members, m.vnodes, reports):
            info = self.workers[w]
            if info.state in (WorkerState.MEMBER, WorkerState.LEAVING):
                info.held_step = self.step
            if r.step_time_s > 0:
                rate = len(vnodes) / r.step_time_s
                info.vnode_rate = rate if info.vnode_rate == 0 else 0.7 * info.vnode_rate + 0.3 * rate
        if any(self.workers[w].state != WorkerState.MEMBER for w in m.members) or any(
                w.state == WorkerState.READY for w in self.workers.values()):
            self._needs_reform = True  # joins and leaves take effect at this boundary
        elif self.placement_policy == "throughput" and self.step < self.steps and \
                self.step - m.step >= self.rebalance_every:
            # Mixed devices: follow measured speed, so nobody waits for a straggler. The per-VN
            # batch is fixed, so this changes only who computes what, never the math.
            better = placement.rebalance([len(v) for v in m.vnodes], [self.workers[w].vnode_rate for w in m.members])
            if better is not None:
                self._next_counts = better
                self._needs_reform = True

    def _feed_plugins(self, m: Membership, reports: list[Report]) -> bool:
        """Event.STEP_COMMITTED: the plugins consume the step's reports, in virtual-node order of the
        members (and those of the evaluation pass it carried). A plugin that fails fails the job
        (False), with its error named."""
        order = sorted(range(len(reports)), key=lambda r: m.vnodes[r][0] if m.vnodes[r] else -1)
        started = time.perf_counter()
        try:
            self.host.on_commit(self.step, [reports[r].reports for r in order], self.host.eval_due(self.step),
                                [reports[r].eval_reports for r in order], training=self.step < self.steps)
        except Exception as exc:  # noqa: BLE001 - the plugin's own code: its error ends the job, the master lives
            self.fail("", f"a plugin failed at step {self.step}: {type(exc).__name__}: {exc}", type(exc).__name__)
            return False
        finally:
            self._time("plugins", time.perf_counter() - started)
        return True

    def _time(self, name: str, seconds: float) -> None:
        self.timings[name][0] += 1
        self.timings[name][1] += seconds

    def _abort_current(self, reason: str, cause: str) -> None:
        """Abort the step in flight: its members redo it in a new epoch. The ``max_step_attempts``-th
        abort of one step in a row fails the job with the last reason: a failure that recurs at
        every attempt (a bug that raises each time) must not loop for ever."""
        if self.metrics is not None and self.membership is not None and self.step < self.steps:
            self.metrics.event("aborted", self.step, membership_epoch=self.membership.epoch, reason=reason[:500])
        if self.membership is not None:
            self._decide((self.membership.epoch, self.step), Decision.ABORT)
        self.reports = {}
        self._needs_reform = True
        self._aborts = (self.step, self._aborts[1] + 1 if self._aborts[0] == self.step else 1)
        self.aborted += 1
        self.aborted_by_cause[cause] += 1
        self.last_abort = {"step": self.step, "membership_epoch": self.membership.epoch if self.membership else 0,
                           "reason": reason[:500], "attempt": self._aborts[1], "time": round(time.time(), 3)}
        if self._aborts[1] >= self.max_step_attempts:
            self.fail("", f"step {self.step} was aborted {self._aborts[1]} times in a row (max_step_attempts="
                      f"{self.max_step_attempts}, env {MAX_STEP_ATTEMPTS_ENV}); the last attempt: {reason}",
                      "StepAttemptsExceeded")

    def _speed(self, w: WorkerInfo) -> float:
        """Virtual nodes per second: measured if known, else declared samples/s over the VN batch."""
        return w.vnode_rate or w.throughput / self.vnode_batch_size

    def _plan_for(self, info: WorkerInfo) -> Plan:
        if self.state == JobState.FAILED:
            return Plan(PlanKind.STOP, stop_reason=f"job failed: {self.failure.message if self.failure else ''}")
        if info.state == WorkerState.LEFT:
            return Plan(PlanKind.STOP, stop_reason="left the job")
        if self._needs_reform:
            keeper = self._handoff()
            if keeper is not None:  # the state goes to disk before the last worker holding it leaves
                if info is keeper:
                    self._checkpoint_asked_s.setdefault(self.step, self.clock())
                    return Plan(PlanKind.CHECKPOINT, self.membership, self.step,
                                plugin_state=self._plugin_snapshot(self.step))
                return Plan(PlanKind.WAIT)
            self._reform()
        m = self.membership
        if m is None or info.worker_id not in m:
            if self.state == JobState.DONE:
                return Plan(PlanKind.STOP, stop_reason="job finished")
            return Plan(PlanKind.WAIT)
        rank = m.rank_of(info.worker_id)
        eval_epoch = self.host.eval_due(self.step) if self.host is not None else -1
        evaluate = self._evaluation_due(self.step)
        if (eval_epoch >= 0 or evaluate) and self.step >= self.steps:
            # the last evaluation passes (the plugins' last epoch, the job's own), before the last checkpoint
            if (m.epoch, self.step) in self.decisions:
                return Plan(PlanKind.WAIT)
            self._in_flight = (m.epoch, self.step)
            return Plan(PlanKind.EVAL, m, self.step, eval_epoch=eval_epoch, evaluate=evaluate)
        checkpoint_due = self.step > max(self.checkpoint_step, 0) and (
            self.step >= self.steps or (self.checkpoint_every and self.step % self.checkpoint_every == 0))
        if checkpoint_due:
            # Written by the first member that holds the state: rank 0 may have just joined without it
            # (it is synced by the next step, and the last step has none).
            writer = next((w for w in m.members if self.workers[w].held_step == self.step), None)
            if info.worker_id == writer:
                self._checkpoint_asked_s.setdefault(self.step, self.clock())
                return Plan(PlanKind.CHECKPOINT, m, self.step, plugin_state=self._plugin_snapshot(self.step))
            return Plan(PlanKind.WAIT)
        if self._finished():
            self.state = JobState.DONE
            return Plan(PlanKind.STOP, stop_reason="job finished")
        if (m.epoch, self.step) in self.decisions:
            return Plan(PlanKind.WAIT)
        self._in_flight = (m.epoch, self.step)
        # Event.PLAN: the plugins' inputs for this member's nodes (a function of the committed steps).
        inputs = self.host.inputs_for(self.step, m.vnodes[rank]) if self.host is not None else {}
        return Plan(PlanKind.RUN, m, self.step, eval_epoch=eval_epoch, inputs=inputs, evaluate=evaluate)

    def _evaluation_due(self, step: int) -> bool:
        """Whether the job's evaluation runs with the weights of ``step`` (not done yet): every
        ``eval_every`` steps, and after the last step."""
        if self.eval_every < 0 or step > self.steps or (self.evaluations and self.evaluations[-1]["step"] >= step):
            return False
        return step == self.steps or (self.eval_every > 0 and step > 0 and step % self.eval_every == 0)

    def _record_evaluation(self, m: Membership, reports: list[Report]) -> Optional[dict]:
        """The job's evaluation carried by this step's reports: each metric's sum over every virtual
        node, added in node order, over the sample count (the same value on any worker count)."""
        if not self._evaluation_due(self.step):
            return None
        nodes: dict[int, tuple[int, dict[str, float]]] = {}
        for r in reports:
            nodes.update(r.evaluations)
        if sorted(nodes) != list(range(self.virtual_nodes)):
            raise BadRequest(f"the evaluation of step {self.step} covers virtual nodes {sorted(nodes)[:8]}..., "
                             f"not all {self.virtual_nodes}")
        count = sum(c for c, _ in nodes.values())
        if count <= 0:
            raise BadRequest(f"the evaluation of step {self.step} reports no sample")
        totals: dict[str, float] = {}
        for v in range(self.virtual_nodes):
            for name, value in nodes[v][1].items():
                totals[name] = totals.get(name, 0.0) + value
        evaluation = {"step": self.step, **{name: total / count for name, total in totals.items()}}
        self.evaluations.append(evaluation)
        if self.metrics is not None:
            self.metrics.event("evaluation", self.step, samples=count, metrics=evaluation)
        return evaluation

    def _plugin_snapshot(self, step: int) -> Optional[dict]:
        """The plugins' state at ``step`` (every step before it consumed), taken once per step."""
        if self.host is None:
            return None
        if step not in self._plugin_snapshots:
            started = time.perf_counter()
            self._plugin_snapshots[step] = self.host.state_dict()
            self._time("plugins", time.perf_counter() - started)
            for old in sorted(self._plugin_snapshots)[:-4]:
                del self._plugin_snapshots[old]
        return self._plugin_snapshots[step]

    def _handoff(self) -> Optional[WorkerInfo]:
        """The leaving worker (a drain: SIGTERM, a service moving it) that must write a checkpoint
        before it goes, because no staying worker holds the job's state: None if one does, if the
        checkpoint on disk is the state's, or if there is no run directory. A SIGKILL cannot hand
        the state over; a drain does, so that moving a job's every worker never loses it."""
        if self.durable is None or self.membership is None or self.step == 0 or self.checkpoint_step >= self.step:
            return None
        if self._in_flight is not None and self._in_flight not in self.decisions:
            return None  # a step is in flight: the boundary comes first
        if any(w.state in (WorkerState.READY, WorkerState.MEMBER) and w.held_step == self.step
               for w in self.workers.values()):
            return None
        leaving = [w for w in self.workers.values() if w.state == WorkerState.LEAVING and w.held_step == self.step
                   and w.worker_id in self.membership.members]
        return min(leaving, key=lambda w: w.joined_order) if leaving else None

    def _reform(self) -> None:
        """The one place the membership changes. Only called at a step boundary."""
        if self.state in (JobState.DONE, JobState.FAILED):
            return
        if self._in_flight is not None and self._in_flight not in self.decisions:
            return  # a step is in flight: joins and leaves wait for its commit or abort
        for w in self.workers.values():
            if w.state == WorkerState.LEAVING:
                w.state = WorkerState.LEFT
        candidates = sorted((w for w in self.workers.values() if w.state in (WorkerState.READY, WorkerState.MEMBER)),
                            key=lambda w: w.joined_order)
        # Waits leave _needs_reform set: the next plan request (they poll) tries again.
        if self.epoch_counter == 0 and len(candidates) < self.expected_workers and self.clock() < self.start_deadline_s:
            return  # first formation: give the launcher's workers a moment to arrive
        standby, candidates = candidates[self.virtual_nodes:], candidates[:self.virtual_nodes]
        holders = [r for r, w in enumerate(candidates) if w.held_step == self.step]
        if candidates and not holders and self._restored and self.clock() < self.start_deadline_s and (
                self._awaited is None or self._awaited
                or any(w.state == WorkerState.REGISTERED for w in self.workers.values())):
            # A restarted master: give the workers that may hold the state time to reconnect (until
            # every worker of the previous master is back and has asked for a plan, if it is known).
            return
        self._needs_reform = False
        if self.membership is not None:
            self.on_epoch_superseded(self.membership.epoch)
        for w in standby:
            w.state = WorkerState.READY  # more workers than VNs: the rest stand by
        if not candidates:
            self.membership = None
            self.state = JobState.WAITING
            return
        if not holders and self._restored and any(w.held_step == self.step - 1 for w in candidates):
            # The master died after recording a commit that no worker received: redo that step.
            self.step -= 1
            self.losses = self.losses[:self.step]
            self.evaluations = [e for e in self.evaluations if e["step"] <= self.step]
            if self.metrics is not None:
                self.metrics.rewind(self.step, [e["step"] for e in self.evaluations])
            holders = [r for r, w in enumerate(candidates) if w.held_step == self.step]
        self._restored = False
        if len(holders) == len(candidates):
            sync = SYNC_NONE
        elif holders:
            sync = holders[0]
        else:
            on_disk = self._checkpoint_step_on_disk()
            if on_disk is None:
                self.fail("", "every worker holding the job's state was lost and there is no checkpoint "
                          "to resume from; pass checkpoint_every to keep one")
                return
            if self.host is not None:  # the plugins go back to the checkpoint's state with everything else
                self._plugin_snapshots = {k: v for k, v in self._plugin_snapshots.items() if k <= on_disk}
                state = self._plugin_snapshots.get(on_disk)
                self.host.load_state_dict(state if state is not None else self._plugin_state_at(on_disk))
            self.step = on_disk
            self.losses = self.losses[:on_disk]
            self.evaluations = [e for e in self.evaluations if e["step"] <= on_disk]
            if self.metrics is not None:
                self.metrics.rewind(on_disk, [e["step"] for e in self.evaluations])
            self.checkpoint_step = max(self.checkpoint_step, on_disk)  # it exists even if never reported
            self._persist()
            if self.state == JobState.FAILED:  # the run directory cannot be written
                return
            sync = SYNC_FROM_CHECKPOINT
        if self._next_counts is not None and self.membership is not None and \
                tuple(w.worker_id for w in candidates) == self.membership.members:
            vnodes = placement.ranges(self._next_counts)
        else:
            vnodes = placement.place(self.virtual_nodes, [self._speed(w) for w in candidates], self.placement_policy)
        self._next_counts = None
        self.epoch_counter += 1
        self.membership = Membership(self.epoch_counter, self.step, tuple(w.worker_id for w in candidates),
                                     tuple(tuple(v) for v in vnodes), sync)
        for w in candidates:
            w.state = WorkerState.MEMBER
        set_log_context(membership_epoch=self.epoch_counter, step=self.step)
        self.reports = {}
        self.state = JobState.RUNNING
        if self.metrics is not None:
            self.metrics.event("membership", self.step, membership_epoch=self.epoch_counter, workers=len(candidates),
                               vnodes=[len(v) for v in vnodes])
