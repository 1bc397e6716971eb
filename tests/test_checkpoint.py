"""Contract 5 on one worker: atomic checkpoints, exact resume, refusal of a different job."""

import functools
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from vnodes.runtime import CheckpointMismatch, load_checkpoint, train
from vnodes.runtime.checkpoint import latest_checkpoint, list_checkpoints, newest_checkpoint, verify_checkpoint

from jobs import cnn_spec, det_f32_spec


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("deterministic", [True, False])
def test_resume_in_pieces_equals_one_run(tmp_path, deterministic):
    spec = cnn_spec(deterministic=deterministic,
                    lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=4, gamma=0.5))
    full = train(spec, steps=14)
    for steps in (3, 7, 8, 14):  # 6 steps per epoch: pieces end inside and at epoch boundaries
        piece = train(spec, steps=steps, checkpoint_dir=tmp_path)
    assert_bitwise_equal(piece.model_state_dict, full.model_state_dict)
    assert piece.losses == full.losses
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 14 and ckpt["epoch"] == 2
    assert ckpt["sampler"] == {"steps_per_epoch": 6, "position": 14}
    assert ckpt["lr_scheduler"]["last_epoch"] == 14
    assert_bitwise_equal(ckpt["model"], full.model_state_dict)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 14]  # keep=2


def test_resume_refuses_a_different_job_naming_the_field(tmp_path):
    train(cnn_spec(), steps=2, checkpoint_dir=tmp_path)
    for change, field in [
        (dict(seed=8), "seed"),
        (dict(vnode_batch_size=4), "vnode_batch_size"),
        (dict(optimizer=functools.partial(torch.optim.SGD, lr=0.2)), "optimizer"),
        (dict(running_stats="vnode0"), "running_stats"),
    ]:
        with pytest.raises(CheckpointMismatch) as err:
            train(cnn_spec(**change), steps=3, checkpoint_dir=tmp_path)
        assert err.value.fields == [field]
        assert field in str(err.value)
    # Fields that do not change the trajectory resume fine.
    assert train(cnn_spec(loader_workers=0, device="cpu"), steps=3, checkpoint_dir=tmp_path).steps == 3


def test_temporary_files_are_never_read_and_are_swept(tmp_path):
    train(cnn_spec(), steps=2, checkpoint_dir=tmp_path)
    junk = tmp_path / ".tmp-999-step-00000009.pt"
    junk.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path).step == 2
    train(cnn_spec(), steps=3, checkpoint_dir=tmp_path)
    assert not junk.exists()


def test_unreadable_latest_falls_back_to_the_previous(tmp_path):
    train(cnn_spec(), steps=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    (tmp_path / "step-00000002.pt").write_bytes(b"bit rot")
    assert latest_checkpoint(tmp_path).step == 1


def test_load_checkpoint_without_any_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_saved_file_is_complete_when_it_appears(tmp_path):
    """Every visible step-*.pt loads: the name appears only after the data is on disk."""
    train(cnn_spec(), steps=4, checkpoint_dir=tmp_path, checkpoint_every=1, keep_checkpoints=10)
    names = sorted(os.listdir(tmp_path))
    assert names == ["metrics.jsonl"] + [f"step-{s:08d}.pt" for s in range(1, 5)]  # no temporary file left
    for _, path in list_checkpoints(tmp_path):
        torch.load(path, weights_only=True)


def test_a_checkpoint_of_another_seeding_scheme_is_refused(tmp_path, monkeypatch):
    """A vnodes version whose per-node random streams differ (here: the scheme's name changed)
    must not resume this run's checkpoint onto other dropout masks."""
    from vnodes.runtime import spec as spec_module

    train(cnn_spec(), steps=2, checkpoint_dir=tmp_path)
    monkeypatch.setattr(spec_module, "SEEDING_SCHEME", "some-other-scheme")
    with pytest.raises(CheckpointMismatch) as err:
        train(cnn_spec(), steps=3, checkpoint_dir=tmp_path)
    assert err.value.fields == ["seeding"] and "random streams" in str(err.value)


# -- damaged checkpoints (issue 11): verified on load, the newest good one is used ----------------------

JOBS = Path(__file__).parent / "jobs.py"


def vnodes_cli(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("VNODES_FAULT", None)
    return subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def flip_8_bytes_in_a_tensor_record(path: Path) -> bytes:
    """What bit rot does: 8 bytes inside the raw data of the checkpoint's largest tensor, inverted.
    Returns the damaged file's bytes."""
    tensor = max(torch.load(path, weights_only=True)["model"].values(), key=lambda t: t.numel())
    data = bytearray(path.read_bytes())
    start = data.find(tensor.numpy().tobytes())
    assert start > 0 and tensor.numel() * tensor.element_size() >= 64  # the record is in the file, and long
    for i in range(start + 32, start + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def test_flipped_bytes_in_a_tensor_record_are_caught_and_the_run_resumes_from_the_previous(tmp_path):
    """torch.load ignores the CRC-32 of each record: without verification the run trained on from
    weights off by orders of magnitude, and exited 0."""
    spec = cnn_spec(deterministic=True)
    train(spec, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    damaged = flip_8_bytes_in_a_tensor_record(tmp_path / "step-00000004.pt")
    out = vnodes_cli("run", f"{JOBS}:cnn_spec", "--steps", "6", "--checkpoint-dir", str(tmp_path),
                     "--checkpoint-every", "2", "--deterministic", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000004.pt" in out.stderr and "damaged" in out.stderr and "CRC-32" in out.stderr
    assert "Traceback" not in out.stderr
    # The evidence is kept under a name no reader picks up; the run redid steps 2 and 3.
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "step-00000004.pt", "step-00000004.pt.corrupt",
                                            "step-00000006.pt"]
    assert (tmp_path / "step-00000004.pt.corrupt").read_bytes() == damaged
    expected = train(spec, steps=6)
    final = load_checkpoint(tmp_path)
    assert final["step"] == 6 and final["losses"] == expected.losses
    assert_bitwise_equal(final["model"], expected.model_state_dict)


def test_every_reader_agrees_on_the_newest_checkpoint_that_verifies(tmp_path):
    """The master picks its resume step with newest_checkpoint and the workers load with
    latest_checkpoint: a truncated newest one must be skipped by both, whichever asks first."""
    train(cnn_spec(), steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, keep_checkpoints=3)
    newest = tmp_path / "step-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])
    assert verify_checkpoint(newest)[0] is not None and verify_checkpoint(tmp_path / "step-00000002.pt")[0] is None
    assert newest_checkpoint(tmp_path) == (2, tmp_path / "step-00000002.pt")
    assert latest_checkpoint(tmp_path).step == 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]  # renamed aside: no later reader sees it
    assert (tmp_path / "step-00000003.pt.corrupt").exists()


def test_a_damaged_index_that_no_checksum_covers_is_set_aside_by_every_reader(tmp_path):
    """The zip's central directory says the first entry is one byte longer than it is: the CRCs
    still match (zipfile reads the entry's own size), but the file does not load. Found by review:
    the master resumed at its step while the workers, which load, fell back to the one before."""
    train(cnn_spec(), steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, keep_checkpoints=3)
    newest = tmp_path / "step-00000003.pt"
    data = bytearray(newest.read_bytes())
    at = data.find(b"PK\x01\x02") + 20  # the first entry's compressed size
    data[at:at + 4] = (int.from_bytes(data[at:at + 4], "little") + 1).to_bytes(4, "little")
    newest.write_bytes(bytes(data))
    with zipfile.ZipFile(newest) as archive:
        assert archive.testzip() is None  # no checksum sees it
    assert newest_checkpoint(tmp_path) == (2, tmp_path / "step-00000002.pt")  # the master's question
    assert (tmp_path / "step-00000003.pt.corrupt").exists()
    assert latest_checkpoint(tmp_path).step == 2  # the workers' question: the same answer


@pytest.mark.multiprocess
@pytest.mark.slow
def test_truncated_newest_checkpoint_on_the_master_path_resumes_from_the_previous(tmp_path):
    """The master used to skip the truncated file at start but then resume at its step (it listed
    checkpoints without verifying them); the workers refused to load it and the master waited forever."""
    spec = det_f32_spec()
    train(spec, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)  # the same checkpoints on any worker count
    newest = tmp_path / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size - 1000])
    out = vnodes_cli("run", f"{JOBS}:det_f32_spec", "--steps", "6", "--workers", "2", "--checkpoint-dir",
                     str(tmp_path), "--checkpoint-every", "2", "--no-progress", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step-00000004.pt" in out.stderr and "damaged" in out.stderr
    assert (tmp_path / "step-00000004.pt.corrupt").exists()
    expected = train(spec, steps=6)
    final = load_checkpoint(tmp_path)
    assert final["step"] == 6 and final["losses"] == expected.losses
    assert_bitwise_equal(final["model"], expected.model_state_dict)
