"""The master's gRPC face: the only scheduler module that touches generated protobuf types.

Nothing received here is unpickled, and nothing is trusted before it is checked: request bodies
arrive as bytes and are parsed here (an undecodable one is INVALID_ARGUMENT, logged in one line),
every field is validated before the master sees it, and every request after ``Register`` must
carry the session key of the registration it names.

Each error maps to exactly one status code:

| error                  | status code          |
|------------------------|----------------------|
| UnknownWorker          | NOT_FOUND            |
| DuplicateRegistration  | ALREADY_EXISTS       |
| StaleEpoch             | FAILED_PRECONDITION  |
| BadRequest             | INVALID_ARGUMENT     |
| Undecided              | DEADLINE_EXCEEDED    |
| NotYourRegistration    | PERMISSION_DENIED    |
| TooManyWorkers         | RESOURCE_EXHAUSTED   |
| StoreFull              | RESOURCE_EXHAUSTED   |
| missing/wrong token    | UNAUTHENTICATED      |
| anything else          | INTERNAL (logged)    |
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import logging
import math
import re
import struct
import threading
from concurrent import futures
from typing import Optional

import grpc
import torch
from google.protobuf.message import DecodeError

from vnodes.protos import (MAX_REQUEST_BYTES, MESSAGE_LIMITS, PROTOCOL_VERSION, TOKEN_METADATA_KEY, Decision, PlanKind,
                           decision_to_wire,
                           epoch_store_prefix, pack_samples, plan_kind_to_wire, unpack_samples)
from vnodes.runtime.plugins import SampleColumns
from vnodes.protos import vnodes_pb2 as pb

from .errors import (BadRequest, CannotListen, DuplicateRegistration, InsecureListen, NotYourRegistration, StaleEpoch, StoreFull, TooManyWorkers,
                     Undecided, UnknownWorker)
from .master import Master, Report, WorkerInfo
from .rendezvous import RendezvousStore, epoch_of_store_key

log = logging.getLogger(__name__)

_CODES = [
    (UnknownWorker, grpc.StatusCode.NOT_FOUND),
    (DuplicateRegistration, grpc.StatusCode.ALREADY_EXISTS),
    (StaleEpoch, grpc.StatusCode.FAILED_PRECONDITION),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Undecided, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotYourRegistration, grpc.StatusCode.PERMISSION_DENIED),
    (TooManyWorkers, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


COMMIT_WAIT_S = 120.0
# Requests are small (the largest is a commit with plugin reports: ``protos.MAX_REQUEST_BYTES``);
# replies may be large (a checkpoint plan carries the loss history and the plugins' state), so only
# what the master receives is capped this low.
MAX_TEXT = {"host": 255, "device": 64, "device_kind": 255, "worker_id": 64, "evaluation metric": 128,
            "step metric": 128}
MAX_STEP = 2**53  # beyond this a step number is not a count but garbage (and floats lose it)
STORE_WAIT_CAP_S = 10.0  # a store GET/WAIT is answered within this; the worker asks again
MAX_STORE_KEY = 1024
MAX_STORE_VALUE_BYTES = 1 * 2**20
MAX_STORE_KEYS_PER_REQUEST = 64  # gloo and NCCL wait on one key at a time
MAX_PARKED_PER_WORKER = 8  # GET/WAIT long polls one worker may have open at once
_STORE_OPS = frozenset(v for v in pb.StoreRequest.Op.values() if v != pb.StoreRequest.OP_UNSPECIFIED)
_WORKER_ID = re.compile(r"^[A-Za-z0-9._-]*$")


def _code_of(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _message_of(exc: BaseException) -> str:
    return str(exc) if _code_of(exc) != grpc.StatusCode.INTERNAL else f"{type(exc).__name__}: {exc}"


def _parse(kind, data: bytes, rpc: str):
    """``data`` as a ``kind`` message.

    Raises:
        BadRequest: the bytes do not decode (logged in one line, no traceback).
    """
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        log.warning("undecodable %s request (%d bytes): %s", rpc, len(data), exc)
        raise BadRequest(f"the {rpc} request body does not decode as vnodes.v1.{kind.__name__} ({exc}); "
                         "speak the same vnodes protocol as the master") from None


def _samples(messages) -> dict[str, SampleColumns]:
    """Plugin reports of a commit, checked (``BadRequest`` naming what is malformed)."""
    out = {}
    for message in messages:
        try:
            plugin, indices, columns = unpack_samples(message)
            _check(plugin not in out, f"two reports of plugin {plugin[:80]!r} in one commit")
            out[plugin] = SampleColumns(indices, columns)
        except ValueError as exc:
            raise BadRequest(f"a plugin report is malformed: {exc}") from None
    return out


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BadRequest(message)


def _check_text(name: str, value: str) -> None:
    _check(len(value.encode()) <= MAX_TEXT[name], f"{name} is {len(value.encode())} bytes long; at most "
           f"{MAX_TEXT[name]} are accepted")


def _check_number(name: str, value: float, low: float, high: float = MAX_STEP) -> None:
    _check(math.isfinite(value) and low <= value <= high, f"{name} = {value!r} is out of range: it must be a finite "
           f"number in [{low}, {high}]")


async def _abort(context, exc: BaseException, rpc: str):
    code = _code_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", rpc, exc_info=exc)
    await context.abort(code, _message_of(exc))


def _guard(kind):
    """Parse the request body as ``kind``, run the handler, and turn a master error into its one
    status code, never a silent default."""

    def decorate(method):
        async def wrapper(self, data, context):
            try:
                return await method(self, _parse(kind, data, method.__name__), context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status, the server survives
                if isinstance(exc, (grpc.RpcError, asyncio.CancelledError)) or type(exc).__name__ == "AbortError":
                    raise
                await _abort(context, exc, method.__name__)

        wrapper.__name__ = method.__name__
        return wrapper

    return decorate


class _Decided:
    """The asyncio side of one step's decision, shared by every member waiting on it.

    ``wake`` may be called from any thread. One timer per step (not per waiter) runs ``expire``
    ``timeout_s`` after the first accepted report (``arm``): the master then declares the silent members lost, which
    decides the step (ABORT). In steady state every member gets the same reply (COMMIT, and the next
    step in the same membership), so it is built once, in ``reply``.
    """

    __slots__ = ("loop", "future", "table", "key", "loop_thread", "timer", "reply", "expire", "is_decided",
                 "timeout_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, table: dict, key: tuple[int, int], timeout_s: float,
                 expire, is_decided):
        self.loop, self.future, self.table, self.key = loop, loop.create_future(), table, key
        self.loop_thread = threading.get_ident()
        self.expire, self.is_decided, self.timeout_s = expire, is_decided, timeout_s
        self.timer: Optional[asyncio.TimerHandle] = None
        self.reply = None

    def arm(self) -> None:
        """Start the step's clock (once): a report for it was accepted."""
        if self.timer is None and not self.future.done():
            self.timer = self.loop.call_later(self.timeout_s, self._expired)

    def discard_if_unarmed(self) -> None:
        """Forget this entry if no accepted report ever started its clock (a refused report made it)."""
        if self.timer is None and not self.future.done() and self.table.get(self.key) is self:
            del self.table[self.key]

    def _expired(self) -> None:
        if not self.future.done():
            self.expire()  # decides the step (its callbacks call wake) unless there is nothing to expire
            # Decided here or (its wake still queued) on another thread: not a timeout.
            self._set(timed_out=not self.is_decided())

    def wake(self) -> None:  # runs with the master's lock held: only schedules
        if threading.get_ident() == self.loop_thread:
            self._set()
        else:
            self.loop.call_soon_threadsafe(self._set)

    def _set(self, timed_out: bool = False) -> None:
        if not self.future.done():
            self.future.set_result(timed_out)
            if self.timer is not None:
                self.timer.cancel()
            if self.table.get(self.key) is self:
                del self.table[self.key]


class MasterServicer:
    """Asyncio handlers over the thread-safe ``Master``: a waiting commit costs a future, not a thread.

    ``code`` is the job's code package (``code_package.CodePackage``) that workers fetch; ``store``
    the key-value store of torch.distributed's rendezvous (one per master, on this server's loop).
    """

    def __init__(self, master: Master, job: bytes, run_dir: str, checkpoint_every: int, *,
                 commit_timeout_s: float = COMMIT_WAIT_S, code=None, store: Optional[RendezvousStore] = None):
        self.master = master
        self.commit_timeout_s = commit_timeout_s  # first report -> silent members declared lost
        self.job = job
        self.run_dir = run_dir
        self.checkpoint_every = checkpoint_every
        self.code = code
        self.store = store if store is not None else RendezvousStore()
        self._pool = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="vnodes-plan")
        self._members_cache: tuple[int, list] = (-1, [])
        self._decided: dict[tuple[int, int], _Decided] = {}
        self._parked: dict[str, int] = {}  # worker id -> its store reads waiting now
        self._state_cache: tuple = (-1, None, b"")  # (step, plugin state, its bytes)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers. Bodies arrive as bytes: each handler parses its own (see ``_parse``)."""
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        return grpc.method_handlers_generic_handler("vnodes.v1.Master", {
            "Register": unary(self.Register, response_serializer=pb.RegisterReply.SerializeToString),
            "Session": grpc.stream_stream_rpc_method_handler(
                self.Session, response_serializer=pb.MasterMessage.SerializeToString),
            "GetPlan": unary(self.GetPlan, response_serializer=pb.Plan.SerializeToString),
            "Leave": unary(self.Leave, response_serializer=pb.LeaveReply.SerializeToString),
            "Fail": unary(self.Fail, response_serializer=pb.FailReply.SerializeToString),
            "Status": unary(self.Status, response_serializer=pb.StatusReply.SerializeToString),
            "GetCode": stream(self.GetCode, response_serializer=pb.CodeChunk.SerializeToString),
            "EpochStatus": unary(self.EpochStatus, response_serializer=pb.EpochStatusReply.SerializeToString),
            "Store": unary(self.Store, response_serializer=pb.StoreReply.SerializeToString),
        })

    def _authenticate(self, worker_id: str, session_key: str) -> int:
        """The registration a request speaks for. Raises ``UnknownWorker`` or ``NotYourRegistration``."""
        return self.master.authenticate(worker_id, session_key)

    @_guard(pb.RegisterRequest)
    async def Register(self, request, context):
        if request.protocol_version != PROTOCOL_VERSION:
            raise BadRequest(f"the worker speaks vnodes protocol {request.protocol_version or '1 or older'}, this "
                             f"master {PROTOCOL_VERSION}: run the same vnodes version on the master and its workers")
        w = request.worker
        for name, value in (("host", w.host), ("device", w.device), ("device_kind", w.device_kind),
                            ("worker_id", request.worker_id)):
            _check_text(name, value)
        _check(bool(_WORKER_ID.match(request.worker_id)),
               f"worker_id {request.worker_id!r} may hold only letters, digits, '.', '_' and '-'")
        _check_number("throughput", w.throughput, 0.0, math.inf)
        _check_number("pid", w.pid, 0, 2**31 - 1)
        _check_number("memory_bytes", w.memory_bytes, 0, 2**62)
        _check_number("launch_index", w.launch_index, -1, 2**31 - 1)
        _check_number("held_step", request.held_step, -1)
        info = WorkerInfo(worker_id=request.worker_id, host=w.host, pid=w.pid, device=w.device,
                          device_kind=w.device_kind, memory_bytes=w.memory_bytes, throughput=w.throughput,
                          launch_index=w.launch_index, held_step=request.held_step)
        worker_id = self.master.register(info)
        reply = pb.RegisterReply(worker_id=worker_id, job=self.job, run_dir=self.run_dir,
                                 checkpoint_every=self.checkpoint_every, commit_timeout_s=self.commit_timeout_s,
                                 protocol_version=PROTOCOL_VERSION, session_key=info.session_key)
        if self.code is not None:
            reply.code.CopyFrom(pb.CodePackage(digest=self.code.digest, size_bytes=self.code.size_bytes,
                                               main_file=self.code.main_file or ""))
        return reply

    async def Session(self, request_iterator, context):
        """The worker's stream: heartbeats and commits in, one reply per commit out.

        Reading never stops while a commit waits for its peers (the wait runs in its own task), so
        heartbeats keep counting during a long step. When the stream ends or breaks, the worker is
        lost at once: a crashed process cannot finish its step.
        """
        worker_id: Optional[str] = None
        registration: Optional[int] = None  # which registration of worker_id this stream speaks for
        reason = "session stream closed"
        answering: Optional[asyncio.Task] = None
        try:
            async for data in request_iterator:
                try:
                    message = _parse(pb.WorkerMessage, data, "Session")
                    if worker_id is None:  # the first message names the worker and proves it
                        registration = self._authenticate(message.worker_id, message.session_key)
                        worker_id = message.worker_id
                    elif message.worker_id and message.worker_id != worker_id:
                        raise BadRequest(f"this session belongs to worker {worker_id}, not {message.worker_id}")
                    self.master.heartbeat(worker_id, registration)  # every message is a sign of life
                except (BadRequest, NotYourRegistration, UnknownWorker) as exc:
                    if isinstance(exc, UnknownWorker):
                        worker_id = None  # not ours to declare lost
                    await _abort(context, exc, "Session")
                if message.WhichOneof("body") == "commit":
                    # Answered in its own task; each answer waits for the one before: replies in order.
                    answering = asyncio.ensure_future(
                        self._answer_commit(worker_id, registration, message.commit, context, after=answering))
        except (grpc.RpcError, asyncio.CancelledError):
            reason = "session stream broke"
        finally:
            if answering is not None and not answering.done():
                answering.cancel()
            if worker_id is not None:
                self.master.lost(worker_id, reason, registration)

    async def _answer_commit(self, worker_id: str, registration: int, request, context,
                             after: Optional[asyncio.Task]) -> None:
        try:
            reply = await self._commit(worker_id, request, registration)
        except Exception as exc:  # noqa: BLE001 - a wrong commit is refused; the stream stays open
            code = _code_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error answering a commit of %s", worker_id)
            reply = pb.CommitReply(decision=pb.CommitReply.REFUSED, membership_epoch=request.membership_epoch,
                                   step=request.step, error_code=code.value[0], error=_message_of(exc))
        if after is not None and not after.done():
            await asyncio.wait((after,))
        try:
            await context.write(pb.MasterMessage(commit_reply=reply))
        except (grpc.RpcError, RuntimeError):  # the stream is gone: its reader declares the loss
            pass

    @_guard(pb.PlanRequest)
    async def GetPlan(self, request, context):
        self._authenticate(request.worker_id, request.session_key)
        _check_number("held_step", request.held_step, -1)
        _check_number("checkpoint_step", request.checkpoint_step, -1)
        # A long poll (up to 5 s): it waits in a thread so the event loop keeps serving.
        timeout_s = min(5.0, max(0.1, (context.time_remaining() or 6.0) - 1.0))
        plan = await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(self.master.plan, request.worker_id, request.held_step,
                                          request.checkpoint_step, timeout_s))
        return self._plan_message(plan)

    def _plan_message(self, plan, known_epoch: int = -1):
        reply = pb.Plan(kind=plan_kind_to_wire(plan.kind), step=plan.step, stop_reason=plan.stop_reason)
        if plan.membership is not None:
            m = plan.membership
            reply.membership_epoch = m.epoch
            reply.sync_source_rank = m.sync_source_rank
            if m.epoch == known_epoch:
                reply.members_unchanged = True
            else:
                reply.members.extend(self._members_message(m))
        if plan.kind == PlanKind.CHECKPOINT:
            reply.losses.extend(self.master.losses[:plan.step])
            if plan.plugin_state is not None:
                reply.plugin_state = self._plugin_state_bytes(plan.step, plan.plugin_state)
        reply.eval_epoch = plan.eval_epoch
        reply.evaluate = plan.evaluate
        if plan.kind == PlanKind.CHECKPOINT and self.master.evaluations:
            reply.evaluations = json.dumps([e for e in self.master.evaluations if e["step"] <= plan.step])
        for name, cols in plan.inputs.items():
            pack_samples(reply.plugin_inputs.add(), name, cols.indices, cols.columns)
        return reply

    def _plugin_state_bytes(self, step: int, state: dict) -> bytes:
        """The plugins' state of a checkpoint plan, serialized once per step (tensors, numbers and
        strings: what a worker's ``torch.load(weights_only=True)`` reads back)."""
        if self._state_cache[0] != step or self._state_cache[1] is not state:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self._state_cache = (step, state, buffer.getvalue())
        return self._state_cache[2]

    async def _commit(self, worker_id: str, request, registration: Optional[int] = None):
        """Record one commit; wait (without a thread) until its step is decided; build the reply."""
        if len(request.vnode_losses) != 8 * len(request.vnodes):
            raise BadRequest(f"vnode_losses holds {len(request.vnode_losses)} bytes for "
                             f"{len(request.vnodes)} virtual nodes (8 bytes each)")
        _check_number("membership_epoch", request.membership_epoch, 0)
        _check_number("step", request.step, 0)
        _check_number("step_time_s", request.step_time_s, 0.0, 1e9)
        _check(len(set(request.vnodes)) == len(request.vnodes), "vnodes repeats a virtual node")
        values = struct.unpack(f"<{len(request.vnodes)}d", request.vnode_losses)
        if request.ok:
            _check_number("loss", request.loss, -math.inf, math.inf)
            _check(all(math.isfinite(v) for v in values), "vnode_losses holds a NaN or infinite loss")
        evaluations = {}
        for node in request.evaluations:
            _check(len(node.names) == len(node.sums) and node.count >= 0, "an evaluation's names and sums differ in length")
            for name in node.names:
                _check_text("evaluation metric", name)
            evaluations[node.vnode] = (node.count, dict(zip(node.names, node.sums)))
        metrics = request.metrics if request.HasField("metrics") else None
        if metrics is not None:
            _check(not math.isnan(metrics.lr), "metrics.lr is NaN")
            _check(len(metrics.names) == len(metrics.values) <= 64, "metrics.names and metrics.values differ in "
                   "length, or hold more than 64 metrics")
            for name in metrics.names:
                _check_text("step metric", name)
        report = Report(ok=request.ok, loss=request.loss, vnode_losses=dict(zip(request.vnodes, values)),
                        step_time_s=request.step_time_s, reports=_samples(request.plugin_reports),
                        eval_reports=_samples(request.eval_reports),
                        grad_norm=metrics.grad_norm if metrics is not None else math.nan,
                        skipped=metrics.skipped if metrics is not None else False,
                        lr=metrics.lr if metrics is not None else math.nan, evaluations=evaluations,
                        train_metrics=dict(zip(metrics.names, metrics.values)) if metrics is not None else {},
                        error=request.error[:2000])
        epoch, step = request.membership_epoch, request.step
        decided = self._decision_future((epoch, step))
        try:
            self.master.submit(worker_id, epoch, step, report, on_decided=decided.wake, registration=registration)
        except Exception:  # refused: it must not start the step's clock for the members that report
            decided.discard_if_unarmed()
            raise
        decided.arm()
        # shield: a waiter whose stream breaks must not cancel the future its peers wait on
        if await asyncio.shield(decided.future):
            raise Undecided(f"step {step} of epoch {epoch} undecided after {self.commit_timeout_s:.0f} s: "
                            "a peer neither committed nor was declared lost")
        if decided.reply is not None:
            return decided.reply
        decision, next_plan = self.master.outcome(worker_id, epoch, step, want_next=True)
        reply = pb.CommitReply(decision=decision_to_wire(decision),
                               membership_epoch=epoch, step=step)
        evaluation = self.master.evaluation_of(step) if decision == Decision.COMMIT else None
        if evaluation is not None:
            reply.evaluation = json.dumps(evaluation)
        if next_plan is not None:
            reply.next.CopyFrom(self._plan_message(next_plan, known_epoch=epoch))
            if next_plan.membership.epoch == epoch and not next_plan.inputs:  # the same for every member: share it
                decided.reply = reply
        return reply

    def _decision_future(self, key: tuple[int, int]) -> "_Decided":
        """One future per (epoch, step), shared by every member waiting on it: one wake-up per step."""
        decided = self._decided.get(key)
        if decided is None or decided.future.done():
            # No pruning needed: an entry leaves the table when decided, when its timer fires, or at
            # once when the report that made it was refused (discard_if_unarmed).
            decided = self._decided[key] = _Decided(
                asyncio.get_running_loop(), self._decided, key, self.commit_timeout_s,
                functools.partial(self.master.expire, key[0], key[1], self.commit_timeout_s),
                functools.partial(self.master.is_decided, key[0], key[1]))
        return decided

    def _members_message(self, m) -> list:
        """The member list of an epoch, built once per epoch (every plan of the epoch repeats it)."""
        if self._members_cache[0] != m.epoch:
            self._members_cache = (m.epoch, [pb.Member(worker_id=w, vnodes=list(v)) for w, v in zip(m.members, m.vnodes)])
        return self._members_cache[1]

    @_guard(pb.LeaveRequest)
    async def Leave(self, request, context):
        self._authenticate(request.worker_id, request.session_key)
        self.master.leave(request.worker_id)
        return pb.LeaveReply()

    @_guard(pb.FailRequest)
    async def Fail(self, request, context):
        self._authenticate(request.worker_id, request.session_key)
        _check(bool(request.message), "a Fail request needs a message saying what went wrong")
        # Text only, bounded: the master keeps it and shows it.
        self.master.fail(request.worker_id, request.message[:65536], request.error_type[:256],
                         request.traceback[-65536:])
        return pb.FailReply()

    async def GetCode(self, data, context):
        """Stream the job's code package to an admitted worker."""
        try:
            request = _parse(pb.CodeRequest, data, "GetCode")
            self._authenticate(request.worker_id, request.session_key)
            if self.code is None or request.digest != self.code.digest:
                raise BadRequest(f"this job's code package is {self.code.digest if self.code else 'none'}, not "
                                 f"{request.digest!r}: register again to learn it")
        except Exception as exc:  # noqa: BLE001 - as in _guard
            if isinstance(exc, (grpc.RpcError, asyncio.CancelledError)) or type(exc).__name__ == "AbortError":
                raise
            await _abort(context, exc, "GetCode")
        for chunk in self.code.chunks():
            yield pb.CodeChunk(data=chunk)

    @_guard(pb.EpochStatusRequest)
    async def EpochStatus(self, request, context):
        self._authenticate(request.worker_id, request.session_key)
        _check_number("membership_epoch", request.membership_epoch, 0)
        superseded, arrived = self.master.epoch_status(request.worker_id, request.membership_epoch, request.arrive)
        return pb.EpochStatusReply(superseded=superseded, arrived=arrived)

    @_guard(pb.StoreRequest)
    async def Store(self, request, context):
        """One operation of torch.distributed's store, for a member of the epoch its keys belong to.

        Every key lies under ``epoch_store_prefix(e)`` of one epoch ``e``. Keys of a superseded epoch
        are gone: writes to them are dropped and reads find nothing at once (the worker leaves that
        epoch when ``EpochStatus`` says so). A worker may park at most ``MAX_PARKED_PER_WORKER`` reads.
        """
        self._authenticate(request.worker_id, request.session_key)
        op, keys, store = request.op, list(request.keys), self.store
        _check(op in _STORE_OPS, f"unknown store operation {op}: speak the same vnodes protocol as the master")
        _check(all(0 < len(k) <= MAX_STORE_KEY for k in keys) and len(keys) <= MAX_STORE_KEYS_PER_REQUEST,
               f"store keys must be 1 to {MAX_STORE_KEY} characters, at most {MAX_STORE_KEYS_PER_REQUEST} of them")
        _check(len(request.value) <= MAX_STORE_VALUE_BYTES and len(request.expected) <= MAX_STORE_VALUE_BYTES,
               f"store values are at most {MAX_STORE_VALUE_BYTES} bytes")
        _check(op in (pb.StoreRequest.CHECK, pb.StoreRequest.WAIT, pb.StoreRequest.NUM_KEYS) or len(keys) == 1,
               f"store operation {pb.StoreRequest.Op.Name(op)} takes exactly one key, got {len(keys)}")
        _check(abs(request.amount) < 2**62, f"store amount {request.amount} is out of range")
        epochs = {epoch_of_store_key(k) for k in keys}
        _check(None not in epochs and len(epochs) <= 1,
               f"store keys must lie under one membership epoch's prefix ({epoch_store_prefix(0)[:-2]}E/...)")
        reply = pb.StoreReply()
        if epochs and not self.master.may_rendezvous(request.worker_id, epochs.pop()):
            reply.superseded = True  # nothing to read, nothing kept
            return reply
        timeout_s = min(STORE_WAIT_CAP_S, request.timeout_s) if math.isfinite(request.timeout_s) else 0.0
        timeout_s = max(0.0, timeout_s)
        if op == pb.StoreRequest.SET:
            store.set(keys[0], request.value)
        elif op in (pb.StoreRequest.GET, pb.StoreRequest.WAIT):
            parked = self._parked.get(request.worker_id, 0)
            if parked >= MAX_PARKED_PER_WORKER:
                raise BadRequest(f"worker {request.worker_id} already waits on {parked} store reads; "
                                 f"at most {MAX_PARKED_PER_WORKER} at a time")
            self._parked[request.worker_id] = parked + 1
            try:
                if op == pb.StoreRequest.GET:
                    value = await store.get(keys[0], timeout_s)
                    reply.ready, reply.value = value is not None, value or b""
                else:
                    reply.ready = await store.wait(keys, timeout_s)
            finally:
                self._parked[request.worker_id] -= 1
                if not self._parked[request.worker_id]:
                    del self._parked[request.worker_id]
        elif op == pb.StoreRequest.ADD:
            reply.number = store.add(keys[0], request.amount)
        elif op == pb.StoreRequest.CHECK:
            reply.ready = store.check(keys)
        elif op == pb.StoreRequest.COMPARE_SET:
            reply.value = store.compare_set(keys[0], request.expected, request.value)
        elif op == pb.StoreRequest.DELETE:
            reply.number = int(store.delete(keys[0]))
        else:  # NUM_KEYS
            reply.number = store.num_keys()
        return reply

    @_guard(pb.StatusRequest)
    async def Status(self, request, context):
        m = self.master
        with m._cond:
            reply = pb.StatusReply(step=m.step, membership_epoch=m.membership.epoch if m.membership else 0,
                                   steps=m.steps, state=m.state.value, losses=m.losses[-1:],
                                   evaluation=json.dumps(m.evaluations[-1]) if m.evaluations else "",
                                   last_abort=json.dumps(m.last_abort) if m.last_abort else "", aborted=m.aborted)
            reply.epoch = m.data_epoch(m.step)
            vnodes = dict(zip(m.membership.members, m.membership.vnodes)) if m.membership else {}
            for w in sorted(m.workers.values(), key=lambda w: w.joined_order):
                if w.state.value in ("left", "dead"):
                    continue
                reply.workers.add(id=w.worker_id, pid=w.pid, host=w.host, device=w.device,
                                  vnodes=list(vnodes.get(w.worker_id, ())), step_time_s=w.step_time_s,
                                  state=w.state.value)
        return reply


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self.token = token

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: pass the job's token (--token / VNODES_TOKEN)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if hmac.compare_digest(given.encode(), self.token.encode()):
            return await continuation(handler_call_details)
        return self._deny_stream if handler_call_details.method.endswith("/Session") else self._deny


class MasterServer:
    """A ``grpc.aio`` server on its own event-loop thread; ``stop`` may be called from any thread."""

    def __init__(self, servicer: MasterServicer, address: str, interceptors: list,
                 tls: Optional[tuple[bytes, bytes]], max_request_bytes: int = MAX_REQUEST_BYTES):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vnodes-master-grpc", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(
            self._start(servicer, address, interceptors, tls, max_request_bytes), self.loop).result()

    async def _start(self, servicer, address, interceptors, tls, max_request_bytes) -> int:
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_request_bytes),
                   *(o for o in MESSAGE_LIMITS if o[0] != "grpc.max_receive_message_length")]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.server.add_generic_rpc_handlers((servicer.handler(),))
        try:
            if tls is not None:
                bound = self.server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
            else:
                bound = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's way of saying the port is taken or the address is not ours
            raise CannotListen(address, str(exc)) from None
        if bound == 0:
            raise CannotListen(address, "the address cannot be bound")
        await self.server.start()
        return bound

    def stop(self, grace: Optional[float] = None) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:29400``) as gRPC and workers read it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def serve(servicer: MasterServicer, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
          tls: Optional[tuple[bytes, bytes]] = None,
          max_request_bytes: int = MAX_REQUEST_BYTES) -> tuple[MasterServer, int]:
    """Start the master's gRPC server; returns it and the bound port. (The cluster service serves
    its own servicer, anything with ``handler()``, the same way.)

    Listening beyond loopback requires a shared ``token``; ``tls=(key_pem, cert_pem)`` adds TLS.

    Raises:
        InsecureListen: a non-loopback ``host`` without a token (a ``ValueError``).
        CannotListen: the address cannot be bound (an ``OSError``).
    """
    if not is_loopback(host) and not token:
        raise InsecureListen(host)
    interceptors = [_TokenInterceptor(token)] if token else []
    server = MasterServer(servicer, host_port(host, port), interceptors, tls, max_request_bytes)
    return server, server.port
