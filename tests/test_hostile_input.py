"""What a stranger can send the master, reproduced with a raw gRPC client on loopback.

Each test replays an attack found against an earlier version: a pickled payload in ``Fail`` (code
execution in the driver), requests naming another worker (draining or failing it), undecodable
bodies (a traceback per message), and fields that broke planning or grew the master without bound.
"""

import logging
import math
import os
import pickle
import time

import grpc
import pytest

from vnodes.protos import PROTOCOL_VERSION
from vnodes.protos import vnodes_pb2 as pb
from vnodes.protos import vnodes_pb2_grpc as pb_grpc
from vnodes.runtime.errors import JobFailed
from vnodes.scheduler.launcher import job_result
from vnodes.scheduler.master import DEPARTED_KEPT, JobState, Master, WorkerState
from vnodes.scheduler.rendezvous import RendezvousStore
from vnodes.scheduler.servicer import MasterServicer, serve


class RunCommand:
    """Unpickling this runs ``os.system(command)``: the payload of the original attack."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def old_fail_body(worker_id, payload, session_key=""):
    """A FailRequest as the previous protocol spelled it: field 2 held a pickled exception."""
    body = pb.FailRequest(worker_id=worker_id, message="boom", session_key=session_key).SerializeToString()
    length, varint = len(payload), bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return body + b"\x12" + bytes(varint) + payload


@pytest.fixture
def job():
    """A master with one real registration (its member) on a loopback server, and a raw channel."""
    store = RendezvousStore()
    master = Master(4, 100, expected_workers=1, start_grace_s=0,
                    on_epoch_superseded=lambda epoch: store.forget_epochs_before(epoch + 1))
    server, port = serve(MasterServicer(master, b"job", "/tmp", 0, store=store))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.MasterStub(channel)
    reply = register(stub)
    plan = stub.GetPlan(pb.PlanRequest(worker_id=reply.worker_id, session_key=reply.session_key), timeout=10)
    assert plan.kind == pb.Plan.RUN and master.workers[reply.worker_id].state == WorkerState.MEMBER
    master.test_store = store  # for the tests that look inside it
    yield stub, channel, master, reply
    channel.close()
    server.stop(0)


def register(stub, **worker):
    description = dict(host="h", pid=1, device="cpu", device_kind="cpu")
    description.update(worker)
    return stub.Register(pb.RegisterRequest(worker=pb.WorkerDescription(**description),
                                            protocol_version=PROTOCOL_VERSION), timeout=10)


def refused(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def raw(channel, method):
    return channel.unary_unary(f"/vnodes.v1.Master/{method}")  # bytes in, bytes out


def test_a_pickled_payload_in_fail_never_runs(job, tmp_path):
    stub, channel, master, member = job
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunCommand(f"touch {marker}"))
    # A stranger, as in the report: no registration, the old field 2.
    code, _ = refused(lambda: raw(channel, "Fail")(old_fail_body("nobody", payload), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    # Another worker's id without its key.
    code, details = refused(lambda: raw(channel, "Fail")(old_fail_body(member.worker_id, payload), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and member.worker_id in details
    assert master.state == JobState.RUNNING
    # A registered process may fail the job (a NaN is a worker's to report), but what it sends is text:
    # the driver raises it as JobFailed and unpickles nothing.
    intruder = register(stub)
    raw(channel, "Fail")(old_fail_body(intruder.worker_id, payload, intruder.session_key), timeout=5)
    assert master.state == JobState.FAILED
    with pytest.raises(JobFailed, match="boom") as err:
        job_result(master, None, tmp_path, False, 0, 100, 0.0)
    assert err.value.worker_id == intruder.worker_id
    assert not marker.exists()


def test_an_empty_fail_ends_nothing(job):
    stub, channel, master, _ = job
    code, _ = refused(lambda: raw(channel, "Fail")(b"", timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert master.state == JobState.RUNNING


def test_requests_act_only_for_the_registration_that_sent_them(job):
    stub, channel, master, member = job
    victim = stub.Status(pb.StatusRequest(), timeout=5).workers[0].id  # what the report read off Status
    assert victim == member.worker_id
    for key in ("", "0" * 32):
        code, _ = refused(lambda: stub.Leave(pb.LeaveRequest(worker_id=victim, session_key=key), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = refused(lambda: stub.GetPlan(pb.PlanRequest(worker_id=victim, session_key=key, held_step=7),
                                               timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    # A session stream opened in the victim's name is refused, and its end is not the victim's death.
    replies = stub.Session(iter([pb.WorkerMessage(worker_id=victim, heartbeat=pb.Heartbeat())]), timeout=5)
    code, _ = refused(lambda: next(replies))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    info = master.workers[victim]
    assert info.state == WorkerState.MEMBER and info.held_step == 0
    # A key of one registration does not open another's requests.
    other = register(stub)
    code, _ = refused(lambda: stub.Leave(pb.LeaveRequest(worker_id=victim, session_key=other.session_key), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert master.workers[victim].state == WorkerState.MEMBER
    # Its own key works.
    stub.Leave(pb.LeaveRequest(worker_id=victim, session_key=member.session_key), timeout=5)
    assert master.workers[victim].state == WorkerState.LEAVING


def test_undecodable_bodies_get_invalid_argument_and_one_log_line_each(job, caplog):
    _, channel, master, _ = job
    caplog.set_level(logging.INFO)
    garbage = [b"\xff" * 7, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11]
    for method in ("Register", "GetPlan", "Leave", "Fail", "Status", "EpochStatus", "Store"):
        for body in garbage:
            code, details = refused(lambda: raw(channel, method)(body, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, body)
            assert "does not decode" in details
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 7 * len(garbage)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert master.state == JobState.RUNNING


@pytest.mark.parametrize("throughput", [math.nan, math.inf, -1.0])
def test_non_finite_throughput_is_refused_and_planning_goes_on(job, throughput):
    stub, _, master, member = job
    code, details = refused(lambda: register(stub, throughput=throughput))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "throughput" in details
    plan = stub.GetPlan(pb.PlanRequest(worker_id=member.worker_id, session_key=member.session_key), timeout=10)
    assert plan.kind == pb.Plan.RUN


def test_out_of_range_steps_are_refused_and_change_nothing(job):
    stub, _, master, member = job
    ask = dict(worker_id=member.worker_id, session_key=member.session_key)
    before = master.checkpoint_step
    code, details = refused(lambda: stub.GetPlan(pb.PlanRequest(held_step=-5, **ask), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "held_step" in details
    code, details = refused(lambda: stub.GetPlan(pb.PlanRequest(checkpoint_step=2**62, **ask), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "checkpoint_step" in details
    code, details = refused(lambda: stub.GetPlan(pb.PlanRequest(checkpoint_step=5, **ask), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "past the job's committed step 0" in details
    assert master.checkpoint_step == before and master.state == JobState.RUNNING
    assert stub.GetPlan(pb.PlanRequest(held_step=0, **ask), timeout=10).kind == pb.Plan.RUN


def test_registrations_are_bounded(job):
    stub, _, master, _ = job
    code, details = refused(lambda: register(stub, host="x" * 300))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "host" in details
    # Beyond the master's request cap (8 MiB) gRPC itself refuses: the 10 MB host of the report.
    code, _ = refused(lambda: register(stub, host="x" * 10 * 2**20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    ids = [register(stub).worker_id for _ in range(DEPARTED_KEPT + 50)]
    for worker_id in ids:
        master.lost(worker_id, "test: gone")
    register(stub)  # registering prunes the departed beyond the kept ones
    departed = [w for w in master.workers.values() if w.state == WorkerState.DEAD]
    assert len(departed) == DEPARTED_KEPT
    assert {w.worker_id for w in departed} == set(ids[-DEPARTED_KEPT:])  # the newest are kept


def store_call(stub, who, op, keys, **fields):
    return stub.Store(pb.StoreRequest(worker_id=who.worker_id, session_key=who.session_key,
                                      op=pb.StoreRequest.Op.Value(op), keys=keys, **fields), timeout=15)


def test_the_store_holds_only_the_current_epochs_keys_written_by_its_members(job):
    """Found by review: a registered process filled the store with keys outside every epoch (never
    dropped: the next worker was refused), wrote into other epochs, and parked thousands of waits."""
    stub, channel, master, member = job
    epoch = master.membership.epoch
    key = f"epoch/{epoch}//0/0"
    store_call(stub, member, "SET", [key], value=b"addr")
    assert store_call(stub, member, "GET", [key], timeout_s=1).value == b"addr"
    stranger = register(stub)  # registered, not a member of the epoch
    code, details = refused(lambda: store_call(stub, stranger, "SET", [key], value=b"fake"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a member" in details
    for bad in (["elsewhere"], ["epoch/x/1"]):
        code, details = refused(lambda: store_call(stub, member, "SET", bad, value=b"x" * 2**20))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prefix" in details
    code, _ = refused(lambda: store_call(stub, member, "SET", [f"epoch/{epoch + 5}/k"], value=b"x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = refused(lambda: stub.Store(pb.StoreRequest(
        worker_id=member.worker_id, session_key=member.session_key, op=99, keys=[key]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown store operation" in details
    code, _ = refused(lambda: store_call(stub, member, "WAIT", [f"{key}{i}" for i in range(65)], timeout_s=1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for _ in range(2):
        store_call(stub, member, "ADD", [f"epoch/{epoch}/n"], amount=2**62 - 1)
    code, details = refused(lambda: store_call(stub, member, "ADD", [f"epoch/{epoch}/n"], amount=2**62 - 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64-bit" in details
    # A superseded epoch's keys are gone; writes to them are dropped and reads answer at once.
    newcomer = register(stub)
    stub.GetPlan(pb.PlanRequest(worker_id=newcomer.worker_id, session_key=newcomer.session_key), timeout=10)
    master.lost(member.worker_id, "test: supersede the epoch")
    assert master.membership.epoch > epoch and newcomer.worker_id in master.membership
    store_call(stub, newcomer, "SET", [f"epoch/{epoch}/late"], value=b"x")
    t0 = time.monotonic()
    assert not store_call(stub, newcomer, "GET", [f"epoch/{epoch}/late"], timeout_s=5).ready
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + 5
    while any(k.startswith(f"epoch/{epoch}/") for k in list(master.test_store._data)):
        assert time.monotonic() < deadline, "the superseded epoch's keys were not dropped"
        time.sleep(0.05)


def test_a_dead_registrations_key_opens_nothing(job):
    stub, channel, master, _ = job
    ghost = register(stub)
    master.lost(ghost.worker_id, "test: missed heartbeats")
    code, _ = refused(lambda: raw(channel, "Fail")(pb.FailRequest(
        worker_id=ghost.worker_id, session_key=ghost.session_key, message="bye").SerializeToString(), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert master.state == JobState.RUNNING
