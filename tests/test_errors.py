"""Bad input gets an error naming the value and the fix, before any training; NaN stops cleanly."""

import functools
import math

import pytest
import torch
from torch import nn

from vnodes.runtime import InvalidJobSpec, NonFiniteLoss, load_checkpoint, train

from jobs import cnn_spec, scalar_ce


@pytest.mark.parametrize("change,field,text", [
    (dict(virtual_nodes=0), "virtual_nodes", "0"),
    (dict(vnode_batch_size=-2), "vnode_batch_size", "-2"),
    (dict(virtual_nodes=2.5), "virtual_nodes", "2.5"),
    (dict(virtual_nodes=32, vnode_batch_size=8), "dataset", "200 samples"),
    (dict(running_stats="median"), "running_stats", "median"),
    (dict(model=nn.Linear(2, 2)), "model", "callable"),
    (dict(model=lambda: "not a module"), "model", "nn.Module"),
    (dict(optimizer=lambda params: None), "optimizer", "Optimizer"),
    (dict(loss=scalar_ce), "loss", "reduction='none'"),
    (dict(device="tpu:9"), "device", "tpu"),
    (dict(seed=-1), "seed", "-1"),
    (dict(seed=2**64), "seed", str(2**64)),
])
def test_bad_spec_fields(change, field, text):
    with pytest.raises(InvalidJobSpec) as err:
        train(cnn_spec(**change), steps=2)
    assert err.value.field == field
    assert text in str(err.value)


@pytest.mark.parametrize("kwargs,field", [
    (dict(steps=-1), "steps"),
    (dict(steps=2, checkpoint_every=0), "checkpoint_every"),
    (dict(steps=2, workers=0), "workers"),
    (dict(steps=2, workers=5), "workers"),
])
def test_bad_train_arguments(kwargs, field):
    with pytest.raises(InvalidJobSpec) as err:
        train(cnn_spec(), **kwargs)
    assert err.value.field == field


def test_missing_checkpoint_parent(tmp_path):
    with pytest.raises(InvalidJobSpec) as err:
        train(cnn_spec(), steps=1, checkpoint_dir=tmp_path / "nope" / "ckpt")
    assert err.value.field == "checkpoint_dir" and "nope" in str(err.value)
    assert not (tmp_path / "nope").exists()


def test_unpicklable_callable_where_processes_need_it():
    with pytest.raises(InvalidJobSpec) as err:
        train(cnn_spec(loader_workers=1, loss=lambda o, t: o.sum(1)), steps=1)
    assert err.value.field == "loss" and "pickle" in str(err.value)


def test_errors_pickle_across_processes():
    import pickle

    for exc in (InvalidJobSpec("seed", "bad"), NonFiniteLoss(3, 1, math.nan)):
        back = pickle.loads(pickle.dumps(exc))
        assert str(back) == str(exc)


class ExplodeAt:
    """A loss that turns NaN on virtual node ``vnode`` from global step ``step`` on."""

    def __init__(self, step, vnode, vnodes):
        self.calls, self.step, self.vnode, self.vnodes = 0, step, vnode, vnodes

    def __call__(self, outputs, targets):
        step, vnode = divmod(self.calls, self.vnodes)
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
        return loss * math.nan if (step, vnode) == (self.step, self.vnode) else loss


def test_nan_loss_names_step_and_vnode_and_keeps_last_checkpoint(tmp_path):
    train(cnn_spec(), steps=3, checkpoint_dir=tmp_path)
    good = load_checkpoint(tmp_path)
    # Resumes at step 3: the fourth call batch is step 4's, so the NaN lands at step 4, vnode 2.
    spec = cnn_spec(loss=ExplodeAt(step=1, vnode=2, vnodes=4))
    spec.fingerprint = cnn_spec().fingerprint  # same job; only the test's loss object differs
    with pytest.raises(NonFiniteLoss) as err:
        train(spec, steps=10, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert (err.value.step, err.value.vnode_id) == (4, 2)
    assert "step 4" in str(err.value) and "virtual node 2" in str(err.value)
    after = load_checkpoint(tmp_path)
    assert after["step"] == 4  # step 3 was applied and saved; step 4 never was
    assert len(after["losses"]) == 4 and all(math.isfinite(x) for x in after["losses"])
    assert after["losses"][:3] == good["losses"]


def test_model_without_running_statistics_trains():
    """No BatchNorm at all: nothing to average, several VNs on one worker (regression)."""

    spec = cnn_spec(model=functools.partial(nn.Sequential, nn.Flatten(), nn.Linear(64, 4)), virtual_nodes=3)
    result = train(spec, steps=3)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
