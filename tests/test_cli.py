"""The `vnodes` command line, run as a real process."""

import json
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
