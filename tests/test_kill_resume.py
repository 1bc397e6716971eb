"""A real `vnodes run` process SIGKILLed at any moment resumes onto the uninterrupted trajectory."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train

from jobs import cnn_spec

pytestmark = pytest.mark.slow

STEPS = 16
JOB = f"{Path(__file__).parent / 'jobs.py'}:cnn_spec"


def vnodes_run(ckpt_dir, fault=None):
    env = dict(os.environ)
    env.pop("VNODES_FAULT", None)
    if fault:
        env["VNODES_FAULT"] = fault
    cmd = [sys.executable, "-m", "vnodes.scheduler.cli", "run", JOB, "--steps", str(STEPS),
           "--checkpoint-dir", str(ckpt_dir), "--checkpoint-every", "1", "--deterministic", "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def uninterrupted():
    return train(cnn_spec(deterministic=True), steps=STEPS).model_state_dict


def assert_same(ckpt_dir, expected):
    final = load_checkpoint(ckpt_dir)
    assert final["step"] == STEPS
    for k, v in expected.items():
        assert torch.equal(final["model"][k], v), k


# Every event of a step of one process, in loop order (a checkpoint's events count as the step just
# applied): killed at any of them, the step is not on disk yet, everything before it is.
IN_STEP_EVENTS = ("step_start", "batch_loaded", "loss_computed", "backward_done", "reduce", "reduced",
                  "step_committed", "checkpoint_start", "checkpoint_staged")


def test_kill_at_every_phase_then_resume_bitwise(tmp_path, uninterrupted):
    for i, phase in enumerate(IN_STEP_EVENTS):
        step = i + 1
        proc = vnodes_run(tmp_path, fault=f"{phase}:{step}")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (phase, err.decode()[-2000:])
        # Killed in step `step`: nothing of that step may be on disk, everything before it is.
        assert load_checkpoint(tmp_path)["step"] == step, phase
    proc = vnodes_run(tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    assert_same(tmp_path, uninterrupted)


def test_kill_at_random_times_then_resume_bitwise(tmp_path, uninterrupted):
    rng = random.Random(int(os.environ.get("VNODES_TEST_SEED", time.time_ns())))
    kills = 0
    for _ in range(4):
        proc = vnodes_run(tmp_path)
        time.sleep(rng.uniform(1.0, 4.0))  # import + build take ~1-2 s: kills land everywhere
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=120)
    proc = vnodes_run(tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert kills >= 1
    assert_same(tmp_path, uninterrupted)
