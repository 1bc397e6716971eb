"""The `vnodes` command line, run as a real process."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train

from jobs import cnn_spec

JOBS = Path(__file__).parent / "jobs.py"


def vnodes(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_command_and_flag():
    top = vnodes("--help")
    assert top.returncode == 0 and "run" in top.stdout
    run = vnodes("run", "--help")
    for flag in ("--steps", "--checkpoint-dir", "--deterministic", "--checkpoint-every", "--workers", "--json"):
        assert flag in run.stdout


def test_run_named_spec_function_matches_the_api(tmp_path):
    out = vnodes("run", f"{JOBS}:cnn_spec", "--steps", "5", "--checkpoint-dir", str(tmp_path), "--json",
                 "--no-progress")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 5 and summary["samples_per_s"] > 0
    expected = train(cnn_spec(), steps=5)
    assert summary["final_loss"] == pytest.approx(expected.losses[-1], rel=1e-12)
    for k, v in expected.model_state_dict.items():
        assert torch.allclose(load_checkpoint(tmp_path)["model"][k], v, rtol=1e-12, atol=1e-14), k


def test_progress_display_shows_step_loss_rate_and_eta():
    out = vnodes("run", f"{JOBS}:cnn_spec", "--steps", "3")
    assert out.returncode == 0, out.stderr
    for word in ("step", "3/3", "loss", "samples/s", "ETA"):
        assert word in out.stderr


def test_bad_job_file_and_bad_value_exit_2_with_a_clear_message(tmp_path):
    missing = vnodes("run", str(tmp_path / "nope.py"), "--steps", "1")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unnamed = vnodes("run", str(JOBS), "--steps", "1")  # jobs.py defines no `spec`
    assert unnamed.returncode == 2 and "name one with" in unnamed.stderr
    bad = vnodes("run", f"{JOBS}:cnn_spec", "--steps", "-3")
    assert bad.returncode == 2 and "steps" in bad.stderr and "-3" in bad.stderr


def test_run_and_master_take_the_same_job_options():
    from vnodes.scheduler.cli import _parser

    def options(command):
        sub = next(a for a in _parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        return {tuple(a.option_strings): (a.dest, a.type("3") if a.type else None, a.default)
                for a in sub.choices[command]._actions}

    run, master = options("run"), options("master")
    for flags in [("--steps",), ("--checkpoint-dir", "--run-dir"), ("--checkpoint-every",), ("--deterministic",),
                  ("--set",)]:
        assert flags in run and flags in master, flags
        assert run[flags][:2] == master[flags][:2], flags


@pytest.mark.parametrize("item,words", [
    ("vnode_batchsize=4", ["no field 'vnode_batchsize'", "vnode_batch_size"]),
    ("model=foo", ["model is code", "set it in the job file"]),
    ("seed=seven", ["seed takes an integer"]),
    ("deterministic=maybe", ["deterministic takes true or false"]),
    ("seed", ["write FIELD=VALUE"]),
])
def test_a_bad_override_is_refused_with_the_valid_fields(item, words, tmp_path):
    out = vnodes("run", f"{JOBS}:cnn_spec", "--steps", "1", "--set", item)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, (word, out.stderr)


def test_overrides_are_typed_from_the_dataclass():
    from vnodes.scheduler.job_options import parse_overrides

    assert parse_overrides(["seed=11", "deterministic=yes", "num_threads=none", "device=cpu",
                            "fused_group_size=4", "execution=fused"]) == {
        "seed": 11, "deterministic": True, "num_threads": None, "device": "cpu", "fused_group_size": 4,
        "execution": "fused"}


def test_run_with_overrides_trains_the_overridden_job(tmp_path):
    import dataclasses

    out = vnodes("run", f"{JOBS}:cnn_spec", "--steps", "3", "--checkpoint-dir", str(tmp_path), "--no-progress",
                 "--set", "seed=11", "--set", "vnode_batch_size=4", "--deterministic")
    assert out.returncode == 0, out.stderr
    expected = train(dataclasses.replace(cnn_spec(), seed=11, vnode_batch_size=4, deterministic=True), steps=3)
    final = load_checkpoint(tmp_path)
    for k, v in expected.model_state_dict.items():
        assert torch.equal(final["model"][k], v), k
    other = train(cnn_spec(), steps=3).model_state_dict  # the overrides mattered
    assert not all(torch.equal(final["model"][k], v) for k, v in other.items())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_standalone_master_serves_the_job_as_run_does_and_status_shows_a_table(tmp_path):
    import dataclasses
    import os
    import socket
    import time

    from jobs import det_f32_spec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    master = subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", "master", f"{JOBS}:det_f32_spec",
                               "--steps", "4", "--port", str(port), "--checkpoint-dir", str(tmp_path),
                               "--set", "seed=11", "--deterministic", "--checkpoint-every", "2"], env=env)
    worker = subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", "worker", "--master",
                               f"127.0.0.1:{port}", "--slowdown", "200"], env=env)  # steps long enough for status to see
    try:
        deadline = time.monotonic() + 60
        while True:
            table = vnodes("status", "--master", f"127.0.0.1:{port}")
            if table.returncode == 0 and re.search(r"\bmember\b", table.stdout):  # not "membership epoch"
                break
            assert time.monotonic() < deadline, (table.stdout, table.stderr)
            time.sleep(0.5)
        assert "virtual nodes" in table.stdout and "0-3" in table.stdout and "step" in table.stdout
        assert master.wait(timeout=120) == 0 and worker.wait(timeout=60) == 0
    finally:
        for p in (master, worker):
            if p.poll() is None:
                p.kill()
    expected = train(dataclasses.replace(det_f32_spec(), seed=11), steps=4).model_state_dict
    final = load_checkpoint(tmp_path)
    assert final["step"] == 4
    for k, v in expected.items():
        assert torch.equal(final["model"][k], v), k
