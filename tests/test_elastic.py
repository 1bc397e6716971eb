"""Contract 1, 3 and 4 with real worker processes: any worker count, crashes, joins, drains."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from vnodes.runtime import load_checkpoint, train
from vnodes.runtime.checkpoint import check_checkpoint_dir
from vnodes.scheduler.launcher import spawn_worker, start_master

from jobs import cnn_spec, small_cnn

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 12


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


@pytest.mark.parametrize("faults", ["backward:3:1,reduce:8:2", "load:2:0,commit:6:2", "forward:1:2,checkpoint_write:3:0"])
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
    first = spawn_worker(handle.address, 0, env={"VNODES_FAULT": "forward:5"})
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


def test_rendezvous_keys_live_under_a_secret_namespace(tmp_path):
    """Only admitted workers learn where epochs rendezvous: a stranger on the store's port finds nothing."""
    handles = [start_master(f32_spec(), 2, check_checkpoint_dir(tmp_path / str(i)), start_grace_s=0) for i in range(2)]
    try:
        worker = spawn_worker(handles[0].address, 0)
        assert worker.wait(timeout=90) == 0
        ns = handles[0].store_namespace
        assert len(ns) == 32 and ns != handles[1].store_namespace
        store = handles[0].store
        assert store.check([f"{ns}/epoch/1/vnodes-arrived"])
        assert not store.check(["epoch/1/vnodes-arrived"]) and not store.check(["vnodes/epoch/1/vnodes-arrived"])
    finally:
        for h in handles:
            h.stop()


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
