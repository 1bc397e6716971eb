"""Contract 1, 3 and 4 with real worker processes: any worker count, crashes, joins, drains."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train
from vnodes.runtime.checkpoint import check_checkpoint_dir
from vnodes.scheduler.launcher import spawn_worker, start_master

from jobs import cnn_spec, det_f32_spec, small_cnn

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 12
JOBS = Path(__file__).parent / "jobs.py"


def f32_spec(**kw):
    return cnn_spec(model=_f32, deterministic=True, **kw)


def _f32():
    return small_cnn(torch.float32)


@pytest.fixture(scope="module")
def reference():
    """One in-process worker, deterministic: the trajectory every other run must hit bit for bit."""
    return train(f32_spec(), steps=STEPS)


def stop_all(procs, handle):
    for p in procs:
        if p.poll() is None:
            p.kill()
    handle.stop()


def assert_bitwise(state, ref):
    assert state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(state[k], ref[k]), k


def test_three_workers_bitwise_equal_one(reference):
    result = train(f32_spec(), steps=STEPS, workers=3)
    assert_bitwise(result.model_state_dict, reference.model_state_dict)
    assert result.losses == reference.losses


def test_fast_mode_two_workers_matches_within_tolerance():
    ref = train(cnn_spec(), steps=8)  # float64
    got = train(cnn_spec(), steps=8, workers=2)
    for k, v in ref.model_state_dict.items():
        assert torch.allclose(got.model_state_dict[k], v, rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize("faults", ["loss_computed:3:1,reduce:8:2", "step_start:2:0,reduced:6:2", "batch_loaded:1:2,checkpoint_staged:3:0"])
def test_sigkilled_workers_mid_step_cost_nothing(reference, faults):
    """Workers die by SIGKILL in chosen phases (worker, phase, step); the survivors redo, bit for bit."""
    result = train(f32_spec(), steps=STEPS, workers=3, checkpoint_every=2,
                   launch_options={"worker_env": {"VNODES_FAULT": faults}})
    assert_bitwise(result.model_state_dict, reference.model_state_dict)
    assert result.losses == reference.losses


def test_grow_1_to_4_shrink_to_2_status_and_drain(tmp_path):
    steps = 40
    reference = train(f32_spec(), steps=steps)
    handle = start_master(f32_spec(), steps, check_checkpoint_dir(tmp_path), expected_workers=1, start_grace_s=0)
    master = handle.master
    slow = ["--slowdown", "20"]  # ~0.3 s steps, so the job outlives the newcomers' start-up
    procs = [spawn_worker(handle.address, 0, extra_args=slow)]
    try:
        assert master.wait(lambda m: m.step >= 2, timeout_s=60)
        procs += [spawn_worker(handle.address, i, extra_args=slow) for i in (1, 2, 3)]
        assert master.wait(lambda m: m.membership is not None and len(m.membership.members) == 4, timeout_s=60)
        status = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "status", "--master",
                                 handle.address, "--json"], capture_output=True, text=True, timeout=60)
        info = json.loads(status.stdout)
        assert {"step", "epoch", "workers"} <= info.keys()
        assert len(info["workers"]) == 4
        assert sorted(v for w in info["workers"] for v in w["vnodes"]) == list(range(4))
        assert {"id", "pid", "host", "device", "vnodes", "step_time_s"} <= info["workers"][0].keys()
        assert {w["pid"] for w in info["workers"]} == {p.pid for p in procs}
        grown_at = master.step
        for p in procs[2:]:
            p.send_signal(signal.SIGTERM)  # drain: finish the step, leave at the boundary, exit 0
        for p in procs[2:]:
            assert p.wait(timeout=60) == 0
        assert master.wait(lambda m: m.done, timeout_s=120)
        assert master.state.value == "done" and grown_at < steps
        assert master.epoch_counter >= 3  # 1 worker, then 4, then 2
    finally:
        stop_all(procs, handle)
    assert_bitwise(load_checkpoint(tmp_path)["model"], reference.model_state_dict)


def test_losing_every_worker_waits_then_resumes_from_checkpoint(tmp_path, reference):
    handle = start_master(f32_spec(), STEPS, check_checkpoint_dir(tmp_path), expected_workers=1,
                          start_grace_s=0, checkpoint_every=2)
    master = handle.master
    first = spawn_worker(handle.address, 0, env={"VNODES_FAULT": "batch_loaded:5"})
    try:
        assert first.wait(timeout=60) == -signal.SIGKILL
        time.sleep(0.5)
        assert not master.done and master.state.value == "waiting"
        second = spawn_worker(handle.address, 1)
        assert master.wait(lambda m: m.done, timeout_s=120)
        assert second.wait(timeout=30) == 0
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
        handle.stop()
    assert master.state.value == "done"
    assert_bitwise(load_checkpoint(tmp_path)["model"], reference.model_state_dict)


def listening_sockets(pid):
    """Every socket process ``pid`` listens on: TCP in LISTEN, and bound UDP, as ``(ip, port)`` (an
    IPv4 address mapped into IPv6, as gRPC binds it, as the IPv4 address: the same interface)."""
    import ipaddress

    import psutil

    def plain(ip):
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return str(mapped or address)

    return sorted((plain(c.laddr.ip), c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr))


def test_the_master_listens_on_one_port_on_its_address_only(tmp_path):
    """The rendezvous once lived in a TCPStore on a second port, on every interface even for a master
    on 127.0.0.1. Now the master process listens on exactly its gRPC port, on the job's address,
    also while a worker rendezvouses through it."""
    master = subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", "master", f"{JOBS}:det_f32_spec",
                               "--steps", "40", "--host", "127.0.0.1", "--port", "0", "--run-dir", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        line = master.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line
        port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        worker = spawn_worker(f"127.0.0.1:{port}", 0, extra_args=["--slowdown", "20"])
        from vnodes.runtime.master_client import MasterClient

        client = MasterClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while client.status()["step"] < 2:  # the worker formed its epoch through the master's store
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.2)
        client.close()
        assert listening_sockets(master.pid) == [("127.0.0.1", port)]
    finally:
        for p in (worker, master):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _stranger(address, token, stop, seen):
    """What an outsider on the master's port tries, over and over: fake arrivals at the epochs and
    fake arrival and abort keys in the store (the old attack), a bogus peer address, a guessed
    session key; with no token, and with the token but no session key (it then learns the worker
    ids from Status). Appends ``(call, status code or "OK", token sent, a real worker's id)``."""
    import grpc

    from vnodes.protos import epoch_store_prefix
    from vnodes.protos import vnodes_pb2 as pb
    from vnodes.protos import vnodes_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.MasterStub(channel)
    with_token = (("vnodes-token", token),)

    def attempt(call, request, metadata, known):
        try:
            getattr(stub, call)(request, timeout=5, metadata=metadata)
            seen.append((call, "OK", bool(metadata), known))
        except grpc.RpcError as exc:
            seen.append((call, exc.code(), bool(metadata), known))

    while not stop.is_set():
        try:
            ids = [w.id for w in stub.Status(pb.StatusRequest(), timeout=5, metadata=with_token).workers]
        except grpc.RpcError:
            ids = []
        for metadata in ((), with_token):
            for worker_id in ids + ["stranger"]:
                known = worker_id in ids
                for epoch in (1, 2):
                    prefix = epoch_store_prefix(epoch)
                    attempt("EpochStatus", pb.EpochStatusRequest(worker_id=worker_id, membership_epoch=epoch,
                                                                 arrive=True), metadata, known)
                    for request in (
                            pb.StoreRequest(worker_id=worker_id, op=pb.StoreRequest.SET, keys=[prefix + "vnodes-abort"],
                                            value=b"1"),
                            pb.StoreRequest(worker_id=worker_id, op=pb.StoreRequest.ADD,
                                            keys=[prefix + "vnodes-arrived"], amount=100),
                            pb.StoreRequest(worker_id=worker_id, op=pb.StoreRequest.SET, keys=[prefix + "/0/1"],
                                            value=b"a bogus peer address"),
                            pb.StoreRequest(worker_id=worker_id, session_key="0" * 32, op=pb.StoreRequest.NUM_KEYS)):
                        attempt("Store", request, metadata, known)
        stop.wait(0.05)
    channel.close()


def test_a_stranger_can_neither_stall_nor_steer_a_token_protected_job(tmp_path, reference):
    """The old attack: four writes of fake arrival and abort keys stalled a token-protected job for
    180 s. A stranger hammering the Store and EpochStatus calls now gets UNAUTHENTICATED (no token) or
    PERMISSION_DENIED / NOT_FOUND (token, no session key); the job runs its one epoch to the end, bit
    for bit the trajectory of the undisturbed run."""
    import grpc

    token = "s3cret-token"
    handle = start_master(f32_spec(), STEPS, check_checkpoint_dir(tmp_path), expected_workers=2,
                          start_grace_s=60, token=token)
    stop, seen = threading.Event(), []
    stranger = threading.Thread(target=_stranger, args=(handle.address, token, stop, seen), daemon=True)
    stranger.start()
    procs = [spawn_worker(handle.address, i, env={"VNODES_TOKEN": token}) for i in range(2)]
    t0 = time.monotonic()
    try:
        assert handle.master.wait(lambda m: m.done, timeout_s=120)
        took_s = time.monotonic() - t0
    finally:
        stop.set()
        stranger.join(10)
        stop_all(procs, handle)
    assert handle.master.state.value == "done" and handle.master.epoch_counter == 1  # never re-formed
    assert handle.master.losses == reference.losses
    assert_bitwise(load_checkpoint(tmp_path)["model"], reference.model_state_dict)
    assert took_s < 60, f"the job took {took_s:.0f} s"  # the attack cost 180 s
    print(f"job took {took_s:.1f} s under {len(seen)} stranger calls")
    assert len(seen) > 100  # the stranger kept trying for the whole job
    outcomes = set(seen)
    assert {call for call, *_ in outcomes} == {"Store", "EpochStatus"}
    assert not any(code == "OK" for _, code, _, _ in outcomes), outcomes
    assert {code for _, code, token_sent, _ in outcomes if not token_sent} == {grpc.StatusCode.UNAUTHENTICATED}
    with_token = {(code, known) for _, code, token_sent, known in outcomes if token_sent}
    assert (grpc.StatusCode.PERMISSION_DENIED, True) in with_token  # a real worker's id, no session key
    assert {code for code, _ in with_token} <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND}


def test_sigkill_at_a_random_time(tmp_path, reference):
    seed = int(os.environ.get("VNODES_TEST_SEED", time.time_ns()))
    rng = random.Random(seed)
    handle = start_master(f32_spec(), STEPS, check_checkpoint_dir(tmp_path), expected_workers=3, start_grace_s=60)
    slow = ["--slowdown", "10"]
    procs = [spawn_worker(handle.address, i, extra_args=slow) for i in range(3)]
    try:
        assert handle.master.wait(lambda m: m.step >= 1, timeout_s=90)
        time.sleep(rng.uniform(0.0, 1.5))
        victim = rng.randrange(3)
        procs[victim].send_signal(signal.SIGKILL)
        assert handle.master.wait(lambda m: m.done, timeout_s=120), f"seed {seed}"
    finally:
        stop_all(procs, handle)
    assert_bitwise(load_checkpoint(tmp_path)["model"], reference.model_state_dict)


def test_a_peer_lost_at_every_attempt_fails_the_job_at_the_cap(monkeypatch, tmp_path):
    """A retryable failure that recurs at every attempt of step 2 (``VNODES_FAULT=reduce:2:lose`` in
    both worker processes: a ``PeerLost``, as torch.distributed's errors become at the boundary): each
    attempt is aborted and redone, and the third ends the job with the worker's error named, instead
    of looping for ever. (A worker that fails first tears down its group: its peer may then fail
    while forming the next attempt's group, and that error is the last attempt's, named as well.)"""
    from vnodes.runtime import VnodesError

    monkeypatch.setenv("VNODES_FAULT", "reduce:2:lose")
    monkeypatch.setenv("VNODES_MAX_STEP_ATTEMPTS", "3")
    with pytest.raises(VnodesError, match=r"step 2 was aborted 3 times in a row .*could not reduce step 2: "
                                          r"(PeerLost: VNODES_FAULT: injected peer loss at reduce of step 2"
                                          r"|epoch \d+ could not form: \w+: .+)"):
        train(det_f32_spec(), steps=5, checkpoint_dir=tmp_path, workers=2)


def test_a_bug_inside_the_reduction_fails_the_job_at_once_with_its_name(monkeypatch, tmp_path):
    """Any error inside a step's reduction that is not torch.distributed's (a ``RuntimeError`` of the
    step's own code, ``VNODES_FAULT=reduce:2:raise``) is a bug that would recur: the job fails at the
    first attempt, with the error and where it arose, and nothing is redone."""
    from vnodes.runtime import VnodesError

    monkeypatch.setenv("VNODES_FAULT", "reduce:2:raise")
    monkeypatch.setenv("VNODES_MAX_STEP_ATTEMPTS", "3")
    with pytest.raises(VnodesError, match=r"VNODES_FAULT: injected failure at reduce of step 2") as failed:
        train(det_f32_spec(), steps=5, checkpoint_dir=tmp_path, workers=2)
    assert "aborted" not in str(failed.value)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("event") == "aborted"] == [] and max(r["step"] for r in rows) == 2


def test_status_shows_the_last_abort_and_its_cause(capsys):
    """A worker whose reduction failed commits ok=False with the error: the master aborts the step,
    and `vnodes status` (the RPC and the table) names the step, the attempt and the error."""
    from loopback import LoopbackMaster

    from vnodes.runtime.master_client import MasterClient
    from vnodes.scheduler.cli import main

    lm = LoopbackMaster(workers=1)
    try:
        (client, plan), = lm.join_all(1)
        client.start_session()
        decision, _, _ = client.commit(plan.membership_epoch, plan.step, False, 0.0, {}, 0.1,
                                       error="RuntimeError: gloo says the peer is gone")
        assert decision == "abort"
        observer = MasterClient(lm.address)
        status = observer.status()
        observer.close()
        assert status["aborted"] == 1 and status["last_abort"]["step"] == 0 and status["last_abort"]["attempt"] == 1
        assert status["last_abort"]["reason"] == (f"worker {client.worker_id} could not reduce step 0: "
                                                  "RuntimeError: gloo says the peer is gone")
        assert main(["status", "--master", lm.address]) == 0
        shown = " ".join(capsys.readouterr().out.split())
        assert "1 aborted step(s); the last: step 0 (attempt 1)" in shown and "gloo says the peer is gone" in shown
        client.close()
    finally:
        lm.stop()
