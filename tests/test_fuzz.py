"""Fuzzing a live master: while a real job trains (a ``vnodes master`` and two workers, processes on
loopback), hypothesis sends every RPC random bytes and absurd but well-formed messages: negative and
huge steps and epochs, strings up to past the 4 MiB request cap, unknown ids, floods of
registrations. The master never crashes, answers each request with a status code (never INTERNAL
or UNKNOWN, the marks of an unhandled exception), stays bounded in memory, and the job ends with a
one-process run's bits."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
import psutil  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vnodes.protos import PROTOCOL_VERSION  # noqa: E402
from vnodes.protos import vnodes_pb2 as pb  # noqa: E402
from vnodes.runtime import load_checkpoint, train  # noqa: E402

from jobs import det_f32_spec  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

JOB = f"{Path(__file__).parent / 'jobs.py'}:slow_det_spec"
STEPS = 200
SERVICE = "/vnodes.v1.Master/"
UNARY = {"Register": pb.RegisterRequest, "GetPlan": pb.PlanRequest, "Leave": pb.LeaveRequest,
         "Fail": pb.FailRequest, "Status": pb.StatusRequest, "EpochStatus": pb.EpochStatusRequest,
         "Store": pb.StoreRequest}
BAD = {"INTERNAL", "UNKNOWN"}  # an exception the servicer did not turn into a status

ints = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([-1, 0, 1, 2**31, -2**31, 2**63 - 1]))
texts = st.one_of(st.text(max_size=64), st.sampled_from(["", "0" * 12, "x" * 5_000_000]))
floats = st.floats(allow_nan=True, allow_infinity=True)


def message(kind):
    """Well-formed messages of ``kind`` whose scalar fields hold absurd values."""
    fields = {}
    for f in kind.DESCRIPTOR.fields:
        if f.is_repeated or f.message_type is not None:
            continue
        if f.type == f.TYPE_STRING:
            fields[f.name] = texts
        elif f.type == f.TYPE_BYTES:
            fields[f.name] = st.binary(max_size=256)
        elif f.type in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
            fields[f.name] = floats
        elif f.type == f.TYPE_BOOL:
            fields[f.name] = st.booleans()
        elif f.type == f.TYPE_ENUM:
            fields[f.name] = st.integers(-3, 10)
        elif f.type in (f.TYPE_UINT32, f.TYPE_FIXED32):
            fields[f.name] = st.integers(0, 2**32 - 1)
        elif f.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
            fields[f.name] = st.integers(0, 2**64 - 1)
        elif f.type in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32):
            fields[f.name] = st.integers(-2**31, 2**31 - 1)
        else:
            fields[f.name] = ints
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: kind(**values).SerializeToString())


requests = st.one_of(
    st.tuples(st.sampled_from(sorted(UNARY)), st.binary(max_size=512)),  # random bytes
    *[st.tuples(st.just(name), message(kind)) for name, kind in sorted(UNARY.items())],
    st.tuples(st.just("Session"), st.lists(st.one_of(st.binary(max_size=128), message(pb.WorkerMessage)),
                                           max_size=4)),
    st.tuples(st.just("GetCode"), st.one_of(st.binary(max_size=64), message(pb.CodeRequest))),
    st.tuples(st.just("Flood"), st.integers(1, 64)),  # registrations in a row
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vnodes(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env, **kw)


def committed_step(run_dir):
    try:
        return json.loads((run_dir / "master.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def send(channel, name, body):
    """The status code name the master answered with."""
    try:
        if name == "Session":
            list(channel.stream_stream(SERVICE + name)(iter(body), timeout=10))
        elif name == "GetCode":
            list(channel.unary_stream(SERVICE + name)(body, timeout=10))
        elif name == "Flood":
            register = channel.unary_unary(SERVICE + "Register")
            for i in range(body):
                register(pb.RegisterRequest(worker=pb.WorkerDescription(host=f"fuzz-{i}", pid=i),
                                            protocol_version=PROTOCOL_VERSION).SerializeToString(), timeout=10)
        else:
            channel.unary_unary(SERVICE + name)(body, timeout=10)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def test_random_and_absurd_requests_to_every_rpc_of_a_live_master(tmp_path):
    port = free_port()
    master = vnodes("master", JOB, "--steps", str(STEPS), "--port", str(port), "--run-dir", str(tmp_path),
                    "--min-workers", "2", stdout=subprocess.PIPE, text=True)
    workers = [vnodes("worker", "--master", f"127.0.0.1:{port}") for _ in range(2)]
    codes, tried, peak_rss, during_job = {}, [0], [0], [0]
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 << 20)])
        grpc.channel_ready_future(channel).result(timeout=60)
        process = psutil.Process(master.pid)
        start_rss = process.memory_info().rss

        @settings(max_examples=600, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests)
        def fuzz(request):
            name, body = request
            code = send(channel, name, body)
            codes.setdefault(name, {}).setdefault(code, 0)
            codes[name][code] += 1
            tried[0] += 1
            during_job[0] += committed_step(tmp_path) < STEPS
            assert code not in BAD, (name, code)
            assert master.poll() is None or master.returncode == 0, f"the master exited {master.returncode}"
            peak_rss[0] = max(peak_rss[0], process.memory_info().rss) if master.poll() is None else peak_rss[0]

        fuzz()
        out, _ = master.communicate(timeout=300)
        assert master.returncode == 0, out
        assert [w.wait(timeout=60) for w in workers] == [0, 0]
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"fuzz: {tried[0]} requests to a live master ({during_job[0]} while the job trained); "
          f"codes: {json.dumps(codes, sort_keys=True)}; "
          f"master RSS {start_rss / 2**20:.0f} MiB at the start, {peak_rss[0] / 2**20:.0f} MiB at the peak")
    assert tried[0] == 600 and len(codes) == len(UNARY) + 3 and during_job[0] >= 300
    assert peak_rss[0] - start_rss < 300 * 2**20  # bounded: registrations, strings and streams are capped
    final = load_checkpoint(tmp_path)
    reference = train(det_f32_spec(), steps=STEPS).model_state_dict
    assert final["step"] == STEPS
    assert [k for k, v in reference.items() if not torch.equal(final["model"][k], v)] == []
