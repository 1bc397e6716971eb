"""Contract 5 on one worker: atomic checkpoints, exact resume, refusal of a different job."""

import functools
import os

import pytest
import torch

from vnodes.runtime import CheckpointMismatch, load_checkpoint, train
from vnodes.runtime.checkpoint import latest_checkpoint, list_checkpoints

from jobs import cnn_spec


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
    assert names == [f"step-{s:08d}.pt" for s in range(1, 5)]
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
