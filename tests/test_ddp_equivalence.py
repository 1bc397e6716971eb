"""Contract 1 and 2 on one worker, against real DDP (gloo, N processes): the heart of vnodes."""

import functools
import warnings

import pytest
import torch

from vnodes.runtime import train

from ddp_reference import run_ddp
from jobs import cnn_spec, synthetic_images

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 22  # 200 samples / 4 VNs = 50 per VN -> 6 steps per epoch: crosses three epoch boundaries


def _max_rel_err(a: dict, b: dict, keys) -> tuple[float, str]:
    worst, where = 0.0, ""
    for k in keys:
        x, y = a[k].double(), b[k].double()
        err = ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, where = err, k
    return worst, where


def _spec(**changes):
    return cnn_spec(lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.5),
                    **changes)


@functools.lru_cache(maxsize=None)
def _ddp_reference(running_stats: str) -> dict:
    """One DDP run per policy, shared by the tests below (vnodes' settings do not change DDP's)."""
    return run_ddp(_spec(running_stats=running_stats), STEPS)


@pytest.mark.parametrize("running_stats", ["mean", "vnode0"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_real_ddp_float64(running_stats, deterministic):
    spec = _spec(running_stats=running_stats, deterministic=deterministic)
    assert len(synthetic_images()) // spec.virtual_nodes // spec.vnode_batch_size * 3 < STEPS
    ref = _ddp_reference(running_stats)
    ours = train(spec, steps=STEPS)

    params = [k for k in ref["model"] if "running" not in k and "num_batches" not in k]
    buffers = [k for k in ref["model"] if "running" in k]
    err, where = _max_rel_err(ours.model_state_dict, ref["model"], params)
    assert err <= 1e-9, f"parameter {where} differs from DDP: relative error {err:.3e}"
    err, where = _max_rel_err(ours.model_state_dict, ref["model"], buffers)
    assert err <= 1e-9, f"buffer {where} differs from DDP: relative error {err:.3e}"
    for k in ref["model"]:
        if "num_batches" in k:
            assert int(ours.model_state_dict[k]) == int(ref["model"][k]) == STEPS
    assert len(ours.losses) == STEPS
    assert ours.losses == pytest.approx(ref["losses"], rel=1e-9)
    # The run actually trained (the comparison is not between two untouched models).
    init = cnn_spec().model().state_dict()
    assert _max_rel_err(ours.model_state_dict, {k: v for k, v in init.items()}, params)[0] > 1e-3


@pytest.mark.parametrize("running_stats", ["mean", "vnode0"])
@pytest.mark.parametrize("fused_group_size", [None, 3])  # all 4 nodes in one group; groups of 3 and 1
def test_fused_execution_matches_real_ddp_float64(running_stats, fused_group_size):
    """Fused execution (interleaved rows, per-node BatchNorm and Dropout) against DDP itself, not only
    against sequential execution."""
    ref = _ddp_reference(running_stats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to sequential execution warns: it must not happen here
        ours = train(_spec(running_stats=running_stats, execution="fused", fused_group_size=fused_group_size),
                     steps=STEPS)
    err, where = _max_rel_err(ours.model_state_dict, ref["model"],
                              [k for k in ref["model"] if "num_batches" not in k])
    assert err <= 1e-9, f"{where} differs from DDP: relative error {err:.3e}"
    assert ours.losses == pytest.approx(ref["losses"], rel=1e-9)


def test_reference_distinguishes_policies_and_order():
    """The comparison above has teeth: a different running-stats policy or seed is far from DDP."""
    ref = _ddp_reference("mean")
    other_policy = train(_spec(running_stats="vnode0"), steps=STEPS).model_state_dict
    other_seed = train(_spec(running_stats="mean", seed=8), steps=STEPS).model_state_dict
    buffers = [k for k in ref["model"] if "running_mean" in k]
    params = [k for k in ref["model"] if "weight" in k]
    assert _max_rel_err(other_policy, ref["model"], buffers)[0] > 1e-6
    assert _max_rel_err(other_seed, ref["model"], params)[0] > 1e-6
