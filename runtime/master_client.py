"""The worker's side of the wire: the only runtime module that touches generated protobuf types."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import queue
import struct
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import grpc
import torch

from vnodes.protos import (MAX_REQUEST_BYTES, MESSAGE_LIMITS, PROTOCOL_VERSION, TOKEN_METADATA_KEY, PlanKind,
                           SYNC_NONE, decision_from_wire, pack_samples, plan_kind_from_wire, unpack_samples)

from .errors import StaleEpoch, VnodesError
from .plugins import SampleColumns

log = logging.getLogger(__name__)

COMMIT_WAIT_MARGIN_S = 30.0
# While the master is down, gRPC's reconnect backoff (1 s, growing to 2.6 s, 4.2 s... by default)
# leaves a channel blind to a master that has come back: a reconnecting worker could miss the whole
# life of a restarted master that finishes the job quickly. Retry at least every second (connection
# attempts keep gRPC's own timeout: only the pause between attempts is capped).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000))


class _MasterCallError(VnodesError):
    def __init__(self, address: str, detail: str):
        super().__init__(address, detail)
        self.address, self.detail = address, detail


class MasterUnavailable(_MasterCallError):
    """Recoverable: the master is down or restarting; the worker retries."""

    def __str__(self) -> str:
        return f"cannot reach the master at {self.address}: {self.detail}"


class MasterRefused(_MasterCallError):
    """Fatal: the master rejects this worker (e.g. a missing or wrong token)."""

    def __str__(self) -> str:
        return f"the master at {self.address} refused this worker: {self.detail}"


def read_pem(path: str, flag: str) -> bytes:
    """The PEM file given to ``flag``, or a clear error naming both."""
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise VnodesError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise VnodesError(f"{flag} {path}: not a PEM file (expected a '-----BEGIN ...' block)")
    return data


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclasses.dataclass
class _SessionEnded:
    reason: str


@dataclasses.dataclass(frozen=True)
class CodeInfo:
    """The job's code package, as the master announces it (fetched with ``MasterClient.get_code``)."""

    digest: str  # sha256 of the archive
    size_bytes: int
    main_file: str  # the launching script inside the package ("" if none)


@dataclasses.dataclass
class Registration:
    worker_id: str
    job: bytes  # the pickled JobSpec (master -> worker only)
    run_dir: str
    checkpoint_every: int
    session_key: str  # this registration's secret; every later call carries it
    code: Optional[CodeInfo]  # None: no code to fetch
    spec: Any = None  # the JobSpec itself (an in-process master: nothing pickled); else unpickle ``job``
    keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class StoreResult:
    """The answer to one store operation (see ``vnodes.proto`` StoreRequest for which field says what)."""

    ready: bool
    value: bytes
    number: int
    superseded: bool = False  # the keys' membership epoch is over: they are gone


@dataclasses.dataclass
class PlanView:
    kind: PlanKind
    membership_epoch: int = 0
    step: int = 0
    members: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)  # rank order
    sync_source_rank: int = SYNC_NONE
    stop_reason: str = ""
    losses: list[float] = dataclasses.field(default_factory=list)
    eval_epoch: int = -1  # >= 0: run the plugins' evaluation pass for that data epoch first (RUN) or alone (EVAL)
    inputs: dict[str, SampleColumns] = dataclasses.field(default_factory=dict)  # mutators' per-sample inputs
    plugin_state: Optional[dict[str, Any]] = None  # CHECKPOINT: the master's plugin state, for the checkpoint
    evaluate: bool = False  # run the job's evaluation of these nodes' shards first (RUN) or alone (EVAL)
    evaluations: list[dict] = dataclasses.field(default_factory=list)  # CHECKPOINT: the job's evaluations so far

    def rank_of(self, worker_id: str) -> int:
        return [m[0] for m in self.members].index(worker_id)


class MasterClient:
    """Blocking calls to the master. ``Raises:`` ``MasterUnavailable`` when it cannot be reached."""

    def __init__(self, address: str, token: Optional[str] = None, tls_root_cert: Optional[bytes] = None):
        from vnodes.protos import vnodes_pb2, vnodes_pb2_grpc

        self.pb = vnodes_pb2
        self.address = address
        if tls_root_cert is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_root_cert),
                                               options=[*MESSAGE_LIMITS, *RECONNECT_OPTIONS])
        else:
            self.channel = grpc.insecure_channel(address, options=[*MESSAGE_LIMITS, *RECONNECT_OPTIONS])
        self.stub = vnodes_pb2_grpc.MasterStub(self.channel)
        self.metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
        self.worker_id, self.session_key = "", ""  # set by register(): who this client speaks for
        self._members: tuple[int, list] = (-1, [])  # the last full member list: (epoch, members)
        self._session: Optional[threading.Thread] = None
        self._stop_session = threading.Event()
        self._outbox: queue.Queue = queue.Queue()  # messages for the session stream (None: end it)
        self._replies: queue.Queue = queue.Queue()  # commit replies, or a _SessionEnded
        self.commit_wait_s = 150.0  # until the master says how long it lets a step wait

    def _call(self, method, request, timeout: float = 30.0):
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self._raise_for(exc.code(), exc.details() or exc.code().name, exc)

    def _raise_for(self, code: grpc.StatusCode, details: str, cause: Optional[BaseException] = None):
        """One meaning per status code, for unary calls and for refusals on the session stream."""
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise StaleEpoch(-1, -1) from cause
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise MasterUnavailable(self.address, details) from cause
        if code == grpc.StatusCode.ALREADY_EXISTS:  # our old session is not yet seen as closed
            raise MasterUnavailable(self.address, f"still registered: {details}") from cause
        if code == grpc.StatusCode.NOT_FOUND:  # a restarted master does not know us yet
            raise MasterUnavailable(self.address, f"master forgot this worker: {details}") from cause
        # Anything else is final: a wrong token or key, a protocol mismatch, a refused value.
        raise MasterRefused(self.address, details if code in (grpc.StatusCode.UNAUTHENTICATED,
                                                              grpc.StatusCode.INVALID_ARGUMENT)
                            else f"{code.name}: {details}") from cause

    def register(self, *, host: str, pid: int, device: str, device_kind: str, memory_bytes: int,
                 throughput: float, launch_index: int, worker_id: str = "", held_step: int = -1,
                 connect_timeout_s: float = 30.0) -> Registration:
        pb = self.pb
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise MasterUnavailable(self.address, f"not reachable within {connect_timeout_s:.1f} s") from None
        reply = self._call(self.stub.Register, pb.RegisterRequest(
            worker=pb.WorkerDescription(host=host, pid=pid, device=device, device_kind=device_kind,
                                        memory_bytes=memory_bytes, throughput=throughput,
                                        launch_index=launch_index),
            worker_id=worker_id, held_step=held_step, protocol_version=PROTOCOL_VERSION))
        if reply.protocol_version != PROTOCOL_VERSION:
            raise VnodesError(f"the master at {self.address} speaks vnodes protocol "
                              f"{reply.protocol_version or '1 or older'}, this worker {PROTOCOL_VERSION}: run the "
                              "same vnodes version on the master and its workers")
        if reply.commit_timeout_s > 0:  # the master decides by then; a margin for the reply to arrive
            self.commit_wait_s = reply.commit_timeout_s + COMMIT_WAIT_MARGIN_S
        self.worker_id, self.session_key = reply.worker_id, reply.session_key
        code = None
        if reply.HasField("code") and reply.code.digest:
            code = CodeInfo(reply.code.digest, reply.code.size_bytes, reply.code.main_file)
        return Registration(reply.worker_id, reply.job, reply.run_dir, reply.checkpoint_every, reply.session_key, code)

    def start_session(self, interval_s: float = 1.0) -> None:
        """Open the session stream: heartbeats (background) and commits go out on it, commit
        replies come back on it. The master declares this worker dead when it breaks."""
        pb = self.pb
        outbox, replies, stopping = self._outbox, self._replies, self._stop_session
        worker_id, session_key = self.worker_id, self.session_key

        def messages():
            # The first message names us and proves it: the stream speaks for this registration only.
            yield pb.WorkerMessage(worker_id=worker_id, session_key=session_key, heartbeat=pb.Heartbeat())
            while not stopping.is_set():
                try:
                    message = outbox.get(timeout=interval_s)
                except queue.Empty:
                    message = pb.WorkerMessage(heartbeat=pb.Heartbeat())
                if message is None:
                    return
                yield message

        def read(stream):
            try:
                for message in stream:
                    if message.WhichOneof("body") == "commit_reply":
                        replies.put(message.commit_reply)
                    else:  # a newer master's message this version does not know: not a decision
                        log.warning("ignoring a session message without a known body from %s", self.address)
                replies.put(_SessionEnded("the master closed the session"))
            except grpc.RpcError as exc:
                replies.put(_SessionEnded(exc.details() or exc.code().name))

        stream = self.stub.Session(messages(), metadata=self.metadata)
        self._session = threading.Thread(target=read, args=(stream,), name="vnodes-session", daemon=True)
        self._session.start()

    def plan(self, held_step: int, checkpoint_step: int) -> PlanView:
        pb = self.pb
        reply = self._call(self.stub.GetPlan, pb.PlanRequest(worker_id=self.worker_id, session_key=self.session_key,
                                                              held_step=held_step, checkpoint_step=checkpoint_step))
        return self._plan_view(reply)

    def _plan_view(self, reply) -> PlanView:
        kind = plan_kind_from_wire(reply.kind)
        if reply.members_unchanged and self._members[0] == reply.membership_epoch:
            members = self._members[1]
        else:
            members = [(m.worker_id, list(m.vnodes)) for m in reply.members]
            if members:
                self._members = (reply.membership_epoch, members)
        inputs = {}
        for data in reply.plugin_inputs:
            plugin, indices, columns = unpack_samples(data)
            inputs[plugin] = SampleColumns(indices, columns)
        state = None
        if reply.plugin_state:
            state = torch.load(io.BytesIO(reply.plugin_state), map_location="cpu", weights_only=True)
        return PlanView(kind, reply.membership_epoch, reply.step, members, reply.sync_source_rank,
                        reply.stop_reason, list(reply.losses), reply.eval_epoch, inputs, state, reply.evaluate,
                        json.loads(reply.evaluations) if reply.evaluations else [])

    def commit(self, epoch: int, step: int, ok: bool, loss: float,
               vnode_losses: dict[int, float], step_time_s: float,
               timeout_s: Optional[float] = None, reports: Optional[dict[str, SampleColumns]] = None,
               eval_reports: Optional[dict[str, SampleColumns]] = None,
               metrics=None, evaluations=None, error: str = "") -> tuple[str, Optional[PlanView], Optional[dict]]:
        """Send a commit on the session stream (with the plugins' ``reports`` of the step and
        ``eval_reports`` of an evaluation pass) and wait for its decision.

        Returns ``(Decision.COMMIT | Decision.ABORT, the next plan if the master already knows it,
        the job's evaluation the step carried if any)``.

        Raises:
            MasterUnavailable: the session broke or no decision came within ``timeout_s`` (default:
                the master's commit timeout plus a margin).
            StaleEpoch: the master no longer knows this epoch.
            VnodesError: the reports exceed what the master accepts in one message.
        """
        pb = self.pb
        timeout_s = self.commit_wait_s if timeout_s is None else timeout_s
        if self._session is None:
            raise VnodesError("commit() before start_session(): the session stream carries commits")
        vnodes = sorted(vnode_losses)
        packed = struct.pack(f"<{len(vnodes)}d", *(vnode_losses[v] for v in vnodes))
        request = pb.CommitRequest(membership_epoch=epoch, step=step, ok=ok, loss=loss, vnodes=vnodes,
                                   vnode_losses=packed, step_time_s=step_time_s, error=error)
        for vnode, (count, sums) in sorted((evaluations or {}).items()):  # engine.evaluate_job's, per node
            request.evaluations.add(vnode=vnode, count=count, names=list(sums), sums=list(sums.values()))
        if metrics is not None:  # engine.StepMetrics of the reduced gradient
            request.metrics.grad_norm, request.metrics.skipped, request.metrics.lr = \
                metrics.grad_norm, metrics.skipped, metrics.lr
            request.metrics.names.extend(metrics.values)
            request.metrics.values.extend(metrics.values.values())
        for field, plugin_reports in ((request.plugin_reports, reports), (request.eval_reports, eval_reports)):
            for name, cols in (plugin_reports or {}).items():
                pack_samples(field.add(), name, cols.indices, cols.columns)
        size = request.ByteSize()
        if size > MAX_REQUEST_BYTES - 1024:
            raise VnodesError(f"step {step}: the plugins' reports take {size / 2**20:.1f} MiB, more than the master "
                              f"accepts in one message ({MAX_REQUEST_BYTES / 2**20:.0f} MiB); with an evaluation "
                              "pass, run more workers (each reports its share) or turn the pass off "
                              "(e.g. DynamicsRecorder(eval_pass=False))")
        self._outbox.put(pb.WorkerMessage(commit=request))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise MasterUnavailable(self.address, f"no decision on step {step} within {timeout_s:.0f} s") from None
            if isinstance(reply, _SessionEnded):
                self._replies.put(reply)  # the session stays ended for later calls too
                raise MasterUnavailable(self.address, f"session ended: {reply.reason}")
            if (reply.membership_epoch, reply.step) == (epoch, step):
                break
            log.warning("dropping a reply for step %d of epoch %d while waiting for step %d of epoch %d",
                        reply.step, reply.membership_epoch, step, epoch)
        if reply.decision == pb.CommitReply.REFUSED:
            self._raise_for(_STATUS_CODES.get(reply.error_code, grpc.StatusCode.UNKNOWN), reply.error)
        try:
            decision = decision_from_wire(reply.decision)
        except (KeyError, ValueError):
            raise VnodesError(f"the master answered step {step} with decision {reply.decision}, which this "
                              "worker does not know: upgrade the worker to the master's vnodes version") from None
        return (decision, self._plan_view(reply.next) if reply.HasField("next") else None,
                json.loads(reply.evaluation) if reply.evaluation else None)

    def leave(self) -> None:
        self._call(self.stub.Leave, self.pb.LeaveRequest(worker_id=self.worker_id, session_key=self.session_key))

    def fail(self, message: str, error_type: str, traceback: str) -> None:
        """Report a fatal error of the job (as plain fields: nothing is pickled)."""
        self._call(self.stub.Fail, self.pb.FailRequest(worker_id=self.worker_id, session_key=self.session_key,
                                                       message=message, error_type=error_type, traceback=traceback))

    def get_code(self, digest: str, timeout_s: float = 300.0) -> Iterator[bytes]:
        """The chunks of the job's code package ``digest``.

        Raises:
            MasterUnavailable: the master cannot be reached (or the transfer stalls past ``timeout_s``).
        """
        request = self.pb.CodeRequest(worker_id=self.worker_id, session_key=self.session_key, digest=digest)
        try:
            for chunk in self.stub.GetCode(request, timeout=timeout_s, metadata=self.metadata):
                yield chunk.data
        except grpc.RpcError as exc:
            self._raise_for(exc.code(), exc.details() or exc.code().name, exc)

    def epoch_status(self, membership_epoch: int, arrive: bool = False, timeout_s: float = 10.0) -> tuple[bool, int]:
        """``(superseded, arrived)`` for an epoch's rendezvous; ``arrive`` counts this worker in.

        Raises:
            MasterUnavailable: the master cannot be reached.
        """
        reply = self._call(self.stub.EpochStatus, self.pb.EpochStatusRequest(
            worker_id=self.worker_id, session_key=self.session_key, membership_epoch=membership_epoch,
            arrive=arrive), timeout=timeout_s)
        return reply.superseded, reply.arrived

    def store(self, op: str, keys: Sequence[str], value: bytes = b"", expected: bytes = b"", amount: int = 0,
              timeout_s: float = 0.0) -> StoreResult:
        """One operation on the job's rendezvous store (``op``: a ``StoreRequest.Op`` name, e.g. "GET").

        Raises:
            MasterUnavailable: the master cannot be reached.
        """
        pb = self.pb
        reply = self._call(self.stub.Store, pb.StoreRequest(
            worker_id=self.worker_id, session_key=self.session_key, op=pb.StoreRequest.Op.Value(op), keys=list(keys),
            value=value, expected=expected, amount=amount, timeout_s=timeout_s), timeout=timeout_s + 30.0)
        return StoreResult(reply.ready, reply.value, reply.number, reply.superseded)

    def status(self, timeout_s: float = 10.0) -> dict:
        """The job's status as plain data: ``step``, ``epoch``, ``workers`` (id, pid, host, device,
        vnodes, step_time_s), and more."""
        reply = self._call(self.stub.Status, self.pb.StatusRequest(), timeout=timeout_s)
        return {
            "step": reply.step, "epoch": reply.epoch, "membership_epoch": reply.membership_epoch,
            "steps": reply.steps, "state": reply.state,
            "evaluation": json.loads(reply.evaluation) if reply.evaluation else None,
            "last_abort": json.loads(reply.last_abort) if reply.last_abort else None, "aborted": reply.aborted,
            "loss": reply.losses[-1] if reply.losses else None,
            "workers": [{"id": w.id, "pid": w.pid, "host": w.host, "device": w.device, "vnodes": list(w.vnodes),
                         "step_time_s": w.step_time_s, "state": w.state} for w in reply.workers],
        }

    def close(self) -> None:
        self._stop_session.set()
        self._outbox.put(None)
        if self._session is not None:
            self._session.join(timeout=2.0)
        self.channel.close()
