"""Train for longer: a finished run resumed with more steps, through a master, as a user types it."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train

from jobs import det_f32_spec

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

JOB = f"{Path(__file__).parent / 'jobs.py'}:det_f32_spec"


def vnodes(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env, **kw)


def finish(process, timeout_s=180):
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{process.args[3:6]} did not finish within {timeout_s} s (the resume hangs)")


@pytest.fixture(scope="module")
def reference():
    return train(det_f32_spec(), steps=9).model_state_dict


def assert_final(run_dir, reference, steps):
    final = load_checkpoint(run_dir)
    assert final["step"] == steps and len(final["losses"]) == steps
    for k, v in reference.items():
        assert torch.equal(final["model"][k], v), k


def test_vnodes_run_trains_longer_on_the_same_run_dir(tmp_path, reference):
    first = vnodes("run", JOB, "--steps", "6", "--workers", "2", "--run-dir", str(tmp_path), "--checkpoint-every", "3",
                   "--no-progress")
    assert finish(first) == 0
    longer = vnodes("run", JOB, "--steps", "9", "--workers", "2", "--run-dir", str(tmp_path), "--no-progress")
    assert finish(longer) == 0
    assert_final(tmp_path, reference, 9)


def test_a_master_with_fresh_workers_trains_longer(tmp_path, reference):
    first = vnodes("run", JOB, "--steps", "6", "--workers", "2", "--run-dir", str(tmp_path), "--no-progress")
    assert finish(first) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = vnodes("master", JOB, "--steps", "9", "--port", str(port), "--run-dir", str(tmp_path), "--min-workers", "2")
    workers = [vnodes("worker", "--master", f"127.0.0.1:{port}") for _ in range(2)]
    try:
        assert finish(master) == 0
        assert [finish(w, 60) for w in workers] == [0, 0]
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
    assert_final(tmp_path, reference, 9)
