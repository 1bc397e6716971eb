"""The wire contract on a real gRPC server (loopback): drift, status codes, tokens."""

import importlib.util
import pathlib
import queue

import grpc
import pytest

from vnodes.protos import PROTOCOL_VERSION
from vnodes.protos import vnodes_pb2 as pb
from vnodes.protos import vnodes_pb2_grpc as pb_grpc
from vnodes.scheduler.master import Master
from vnodes.scheduler.servicer import MasterServicer, serve

PROTOS = pathlib.Path(__file__).resolve().parent.parent / "protos"


def test_generated_code_matches_the_proto():
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for name, text in generate.generated_text().items():
        assert (PROTOS / name).read_text() == text, f"{name} drifted: run python protos/generate.py"


@pytest.fixture
def server(request):
    token = getattr(request, "param", None)
    master = Master(4, 10, expected_workers=1, start_grace_s=0)
    servicer = MasterServicer(master, b"job", "/tmp", 0)
    server, port = serve(servicer, token=token)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.MasterStub(channel), master, servicer
    channel.close()
    server.stop(0)


def code_of(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_bad_messages_get_one_clear_status_and_the_master_survives(server):
    stub, master, servicer = server
    code, details = code_of(lambda: stub.GetPlan(pb.PlanRequest(worker_id="ghost", session_key="k"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "ghost" in details
    code, details = code_of(lambda: stub.Register(pb.RegisterRequest(worker=pb.WorkerDescription(host="h", pid=1)),
                                                  timeout=5))  # an older worker: no protocol version
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "same vnodes version" in details
    reply = stub.Register(pb.RegisterRequest(worker=pb.WorkerDescription(host="h", pid=1),
                                             protocol_version=PROTOCOL_VERSION), timeout=5)
    assert reply.protocol_version == PROTOCOL_VERSION
    wid, key = reply.worker_id, reply.session_key
    assert reply.job == b"job" and reply.commit_timeout_s == 120.0 and len(key) == 32
    code, details = code_of(lambda: stub.Register(pb.RegisterRequest(worker_id=wid, protocol_version=PROTOCOL_VERSION),
                                                  timeout=5))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, details = code_of(lambda: stub.Register(
        pb.RegisterRequest(worker=pb.WorkerDescription(throughput=-1), protocol_version=PROTOCOL_VERSION), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "-1" in details
    plan = stub.GetPlan(pb.PlanRequest(worker_id=wid, session_key=key, held_step=0), timeout=10)
    assert plan.kind == pb.Plan.RUN
    # Commits travel on the session stream: a wrong one is refused in-band, the stream stays open.
    outbox = queue.Queue()
    outbox.put(pb.WorkerMessage(worker_id=wid, session_key=key, heartbeat=pb.Heartbeat()))
    replies = stub.Session(iter(outbox.get, None), timeout=20)

    def commit(**fields):
        outbox.put(pb.WorkerMessage(commit=pb.CommitRequest(**fields)))
        return next(replies).commit_reply

    reply = commit(membership_epoch=plan.membership_epoch, step=0, ok=True, vnodes=[0, 1], vnode_losses=b"\x00" * 3)
    assert reply.decision == pb.CommitReply.REFUSED and "8 bytes each" in reply.error
    assert reply.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    reply = commit(membership_epoch=plan.membership_epoch + 3, step=0, ok=True)
    assert reply.decision == pb.CommitReply.REFUSED and "stale" in reply.error
    assert reply.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    # A refused report starts no decision clock (it would declare the real reporters lost early).
    assert (plan.membership_epoch + 3, 0) not in servicer._decided
    # Still healthy: the right commit goes through, and the next plan rides on its reply.
    reply = commit(membership_epoch=plan.membership_epoch, step=0, ok=True, loss=0.5)
    assert reply.decision == pb.CommitReply.COMMIT and master.step == 1
    assert reply.next.kind == pb.Plan.RUN and reply.next.step == 1 and reply.next.members_unchanged
    # A session cannot speak for another worker.
    outbox.put(pb.WorkerMessage(worker_id="someone-else", heartbeat=pb.Heartbeat()))
    with pytest.raises(grpc.RpcError) as err:
        next(replies)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "someone-else" in err.value.details()
    outbox.put(None)
    # Closing the session is a loss for the master: the worker is gone from the status.
    assert master.wait(lambda m: m.workers[wid].state.value == "dead", timeout_s=10)
    status = stub.Status(pb.StatusRequest(), timeout=5)
    assert status.step == 1 and status.workers == []


@pytest.mark.parametrize("server", ["s3cret"], indirect=True)
def test_token_is_required_when_configured(server):
    stub, _, _ = server
    code, details = code_of(lambda: stub.Status(pb.StatusRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in details
    ok = stub.Status(pb.StatusRequest(), timeout=5, metadata=(("vnodes-token", "s3cret"),))
    assert ok.steps == 10


def test_listening_beyond_loopback_needs_a_token():
    with pytest.raises(ValueError, match="token"):
        serve(MasterServicer(Master(4, 1), b"", "/tmp", 0), host="0.0.0.0")


def test_the_worker_waits_for_a_decision_as_long_as_the_master_says():
    """The client's commit wait follows the master's commit timeout (plus a margin), whatever it is."""
    from vnodes.runtime.master_client import COMMIT_WAIT_MARGIN_S, MasterClient

    master = Master(4, 10, expected_workers=1, start_grace_s=0)
    server, port = serve(MasterServicer(master, b"job", "/tmp", 0, commit_timeout_s=300.0))
    client = MasterClient(f"127.0.0.1:{port}")
    try:
        client.register(host="h", pid=1, device="cpu", device_kind="cpu", memory_bytes=0, throughput=1.0,
                        launch_index=0)
        assert client.commit_wait_s == 300.0 + COMMIT_WAIT_MARGIN_S
    finally:
        client.close()
        server.stop(0)
