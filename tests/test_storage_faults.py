"""A read-only or full checkpoint directory stops the job cleanly (issue 11).

The faults are real: a read-only bind mount of the directory onto itself, and a small tmpfs filled
up. Both need root (the tests skip, saying so, where ``mount`` is refused). The contract: the command
exits non-zero with one message that names the directory, the OS error and the fix; workers exit 0;
no temporary file is left; once the directory is fixed, the same command resumes onto the
uninterrupted trajectory.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vnodes.runtime import load_checkpoint, train

from jobs import cnn_spec, det_f32_spec

JOBS = Path(__file__).parent / "jobs.py"
FREE_BYTES = 16 * 1024  # left on the full disk: the master's small files fit, a checkpoint (33 KB+) does not


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"`mount {' '.join(args)}` is not permitted here ({done.stderr.strip()}); "
                    "these tests need root in a namespace that may mount")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)  # a straggler still holds a file


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` is read-only inside the block (a read-only bind mount of itself)."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        assert subprocess.run(["touch", str(path / "probe")], capture_output=True).returncode != 0
        yield
    finally:
        _umount(path)


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int = 1 << 20):
    """``path`` is a fresh tmpfs of ``size_bytes``, unmounted (with what it holds) after the block."""
    path.mkdir(exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path))
    try:
        yield
    finally:
        _umount(path)


def fill(path: Path, leave_bytes: int = FREE_BYTES) -> Path:
    """Fill the file system of ``path`` until ``leave_bytes`` are free; the filler's path."""
    stat = os.statvfs(path)
    filler = path / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def vnodes(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("VNODES_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(*args, timeout=120):
    proc = vnodes("run", *args, "--no-progress")
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # the defect: a job that hangs instead of failing
            proc.kill()
    return proc.returncode, err


def assert_clean_storage_error(code, err, directory: Path, errno_text: str, what: str):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # neither from this process nor from a worker
    line = next(line for line in err.splitlines() if line.startswith("vnodes: error:"))
    for part in (f"cannot write {what}", f"in {directory}:", errno_text, f"make {directory} writable",
                 "run the same command again"):
        assert part in line, (part, line)


def assert_same_model(directory: Path, steps: int, expected: dict):
    final = load_checkpoint(directory)
    assert final["step"] == steps
    for k, v in expected.items():
        assert torch.equal(final["model"][k], v), k


def test_read_only_directory_stops_the_run_with_a_clear_error_then_resumes(tmp_path):
    spec = cnn_spec(deterministic=True)
    train(spec, steps=2, checkpoint_dir=tmp_path)
    before = sorted(os.listdir(tmp_path))
    with read_only(tmp_path):
        code, err = run(f"{JOBS}:cnn_spec", "--steps", "4", "--checkpoint-dir", str(tmp_path),
                        "--checkpoint-every", "1", "--deterministic")
    assert_clean_storage_error(code, err, tmp_path, "[Errno 30] Read-only file system",
                               "checkpoint step-00000003.pt")
    assert sorted(os.listdir(tmp_path)) == before == ["metrics.jsonl", "step-00000002.pt"]
    code, err = run(f"{JOBS}:cnn_spec", "--steps", "4", "--checkpoint-dir", str(tmp_path), "--deterministic")
    assert code == 0, err[-3000:]
    assert_same_model(tmp_path, 4, train(spec, steps=4).model_state_dict)


def test_full_disk_stops_the_run_without_leaving_a_temporary_file_then_resumes(tmp_path):
    spec = cnn_spec(deterministic=True)
    disk = tmp_path / "disk"
    with small_disk(disk):
        filler = fill(disk)
        code, err = run(f"{JOBS}:cnn_spec", "--steps", "3", "--checkpoint-dir", str(disk),
                        "--checkpoint-every", "1", "--deterministic")
        assert_clean_storage_error(code, err, disk, "[Errno 28] No space left on device", "checkpoint step-00000001.pt")
        left = sorted(os.listdir(disk))  # the half-written temporary file is gone
        assert left in (["filler"], ["filler", "metrics.jsonl"]), left  # the metrics rows fit, or none was kept
        if "metrics.jsonl" in left:
            assert all(line.endswith("}") for line in (disk / "metrics.jsonl").read_text().splitlines())
        filler.unlink()  # space freed: the same command now runs to the end
        code, err = run(f"{JOBS}:cnn_spec", "--steps", "3", "--checkpoint-dir", str(disk),
                        "--checkpoint-every", "1", "--deterministic")
        assert code == 0, err[-3000:]
        assert_same_model(disk, 3, train(spec, steps=3).model_state_dict)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_read_only_run_dir_fails_the_master_cleanly_then_resumes(tmp_path):
    """The master's own state (master.json, losses.f64) is written at every commit: the first
    commit fails the job, every worker stops, and ``vnodes run --workers 2`` says why."""
    with read_only(tmp_path):
        code, err = run(f"{JOBS}:det_f32_spec", "--steps", "4", "--workers", "2", "--checkpoint-dir", str(tmp_path))
    assert_clean_storage_error(code, err, tmp_path, "[Errno 30] Read-only file system",
                               "the master's state (master.json, losses.f64)")
    assert os.listdir(tmp_path) == []
    code, err = run(f"{JOBS}:det_f32_spec", "--steps", "4", "--workers", "2", "--checkpoint-dir", str(tmp_path))
    assert code == 0, err[-3000:]
    assert_same_model(tmp_path, 4, train(det_f32_spec(), steps=4).model_state_dict)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_full_run_dir_fails_the_job_from_the_checkpointing_worker(tmp_path):
    """The worker that writes the checkpoint hits the full disk: it reports the error to the
    master, which fails the job; ``vnodes master`` exits 1 with the message, both workers exit 0."""
    disk = tmp_path / "disk"
    with small_disk(disk):
        fill(disk)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        master = vnodes("master", f"{JOBS}:det_f32_spec", "--steps", "4", "--port", str(port), "--run-dir",
                        str(disk), "--checkpoint-every", "2", "--min-workers", "2")
        workers = [vnodes("worker", "--master", f"127.0.0.1:{port}") for _ in range(2)]
        try:
            _, master_err = master.communicate(timeout=120)
            worker_errs = [w.communicate(timeout=60)[1] for w in workers]
        finally:
            for p in [master, *workers]:
                if p.poll() is None:
                    p.kill()
        assert master.returncode == 1, master_err[-3000:]
        assert [w.returncode for w in workers] == [0, 0], worker_errs
        assert not any("Traceback" in e for e in [master_err, *worker_errs]), [master_err, *worker_errs]
        line = next(line for line in master_err.splitlines() if line.startswith("vnodes: job failed"))
        for part in ("cannot write checkpoint step-00000002.pt", f"in {disk}:", "[Errno 28] No space left on device",
                     f"make {disk} writable"):
            assert part in line, (part, line)
        # The master's own files fit; the checkpoint's temporary file is gone.
        assert sorted(os.listdir(disk)) == ["filler", "losses.f64", "master.json", "metrics.jsonl", "outcome.json"]
        outcome = json.loads((disk / "outcome.json").read_text())  # how the job ended, for whoever started it
        assert (outcome["state"], outcome["step"]) == ("failed", 2) and "No space left on device" in outcome["message"]
