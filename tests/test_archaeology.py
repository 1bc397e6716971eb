"""Metadata archaeology, label correction and prioritized sampling: against DDP, across worker
counts, through kills, and on bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vnodes.runtime import InvalidJobSpec, train
from vnodes.runtime.checkpoint import latest_checkpoint
from vnodes.runtime.engine import build_dataset
from vnodes.scheduler.plugins import (DynamicsRecorder, LabelCorrection, MetadataArchaeology, PrioritizedSampling,
                                      analyze, load_dynamics)
from vnodes.scheduler.plugins.probes import SUITES, suite_size

import archaeology_jobs as aj
from ddp_reference import Hooks, run_ddp


def params(run_dir):
    return latest_checkpoint(run_dir).model


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_close(ours: dict, ref: dict, rtol: float):
    for name, value in ref.items():
        if value.is_floating_point():
            torch.testing.assert_close(ours[name], value, rtol=rtol, atol=rtol, msg=name)


# -- the probes --------------------------------------------------------------------------------

def test_the_probed_dataset_alters_exactly_its_probes_the_same_way_everywhere():
    spec = aj.archaeology_spec()
    a, b = build_dataset(spec), build_dataset(spec)
    base = aj.dataset()
    altered = a.altered
    size = suite_size(aj.SAMPLES)
    assert len(altered.mislabeled) == len(altered.corrupted) == 2 * size
    assert not set(altered.mislabeled.tolist()) & set(altered.corrupted.tolist())
    probes = set(altered.mislabeled.tolist()) | set(altered.corrupted.tolist())
    for i in range(aj.SAMPLES):
        (x, y), (x0, y0), (xb, yb) = a[i], base[i], b[i]
        assert torch.equal(x, xb) and int(y) == int(yb)  # same in every process
        if i in altered.mislabeled:
            assert int(y) != int(y0) and torch.equal(x, x0)  # the class always changes
        elif i in altered.corrupted:
            assert int(y) == int(y0) and not torch.equal(x, x0)
            assert torch.equal(x, a[i][0])  # the same noise every time
        else:
            assert i not in probes and torch.equal(x, x0) and int(y) == int(y0)
    other = build_dataset(dataclasses.replace(spec, seed=spec.seed + 1))
    assert not np.array_equal(other.altered.mislabeled, altered.mislabeled)


class Augmented(torch.utils.data.Dataset):
    """Random brightness in ``__getitem__``, from the global generator (as torchvision transforms do)."""

    def __init__(self):
        self.base = aj.dataset()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x * (1 + 0.1 * torch.rand(())), y


def test_an_augmenting_dataset_gets_the_same_probes_whatever_the_process_drew_before():
    spec = aj.spec([DynamicsRecorder(), MetadataArchaeology(suites=("mislabeled", "corrupted"))], dataset=Augmented)
    torch.manual_seed(0)
    a = build_dataset(spec)
    torch.manual_seed(1)
    b = build_dataset(spec)
    assert a.noise_std == b.noise_std
    i = int(a.altered.corrupted[0])
    torch.manual_seed(5)  # the same augmentation draw: the same corrupted input in both processes
    xa = a[i][0]
    torch.manual_seed(5)
    assert torch.equal(xa, b[i][0])


def test_noise_strength_is_relative_to_the_inputs_scale():
    spec = aj.archaeology_spec()
    data = build_dataset(spec)
    i = int(data.altered.corrupted[0])
    delta = (data[i][0] - data.base[i][0]).double()
    scale = torch.stack([data.base[j][0] for j in range(64)]).double().std()
    assert 0.25 < float(delta.std() / scale) < 1.0  # noise=0.5 x the inputs' standard deviation


def test_suite_sizes_follow_the_documented_rule():
    assert suite_size(1797) == 44 and suite_size(4000) == 100 and suite_size(10_000) == 250
    assert suite_size(1_280_000) == 250 and suite_size(100) == 10


# -- metadata archaeology end to end --------------------------------------------------------------

@pytest.fixture(scope="module")
def archaeology_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mapd")
    train(aj.archaeology_spec(), steps=aj.STEPS, checkpoint_dir=run, progress=False)
    return run


def test_analyze_gives_every_sample_a_probability_per_suite(archaeology_run):
    rep = analyze(archaeology_run)
    assert set(rep.p) == set(SUITES) and "mislabeled" in rep.p
    total = sum(rep.p[s].astype(np.float64) for s in SUITES)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert rep.epochs == aj.EPOCHS == load_dynamics(archaeology_run).epochs
    with open(archaeology_run / "archaeology" / "probes.json") as f:
        written = json.load(f)
    for s in SUITES:
        assert set(rep.probes[s].tolist()) == set(written["reference"][s]) | set(written["heldout"][s])
    # the mislabeled probes are the ones the dataset relabelled
    data = build_dataset(aj.archaeology_spec())
    assert set(rep.probes["mislabeled"].tolist()) == set(data.altered.mislabeled.tolist())
    # probes of one suite look alike: the held-out mislabeled probes are voted mislabeled more than
    # the other held-out probes are
    held = rep.heldout
    assert rep.p["mislabeled"][held["mislabeled"]].mean() > rep.p["mislabeled"][held["typical"]].mean() + 0.1
    assert rep.confusion.sum() == sum(len(v) for v in held.values())
    assert 0.25 < rep.heldout_accuracy <= 1.0  # better than chance over four suites
    assert (archaeology_run / "analysis" / "samples.csv").exists()


def test_analyze_without_archaeology_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="MetadataArchaeology"):
        analyze(tmp_path)


# -- label correction ---------------------------------------------------------------------------

@pytest.mark.slow
def test_label_correction_computes_what_ddp_with_the_bootstrapped_loss_computes(tmp_path):
    spec = aj.spec([aj.FixedCorrection()])
    train(spec, steps=12, checkpoint_dir=tmp_path, progress=False)
    ref = run_ddp(spec, 12, hooks=Hooks(loss=aj.correction_loss))
    assert_close(params(tmp_path), ref["model"], rtol=1e-5)  # float32; deterministic mode vs DDP's order


def test_label_correction_starts_after_its_warm_up_from_p_mislabeled(tmp_path):
    spec = aj.archaeology_spec(LabelCorrection(warmup_epochs=2))
    plain = aj.archaeology_spec()
    train(spec, steps=aj.STEPS, checkpoint_dir=tmp_path / "c", progress=False)
    train(plain, steps=aj.STEPS, checkpoint_dir=tmp_path / "p", progress=False)
    c, p = load_dynamics(tmp_path / "c", "train").loss, load_dynamics(tmp_path / "p", "train").loss
    # the same trajectory until the first corrected step (the second step of epoch 2), then not
    np.testing.assert_array_equal(c[:, :2], p[:, :2])
    assert not np.array_equal(c[:, 3], p[:, 3])


# -- prioritized sampling -------------------------------------------------------------------------

@pytest.mark.slow
def test_selective_backprop_computes_what_ddp_with_the_same_choice_computes(tmp_path):
    spec = aj.spec([PrioritizedSampling(keep=aj.KEEP, score="loss", beta=aj.BETA)])
    train(spec, steps=12, checkpoint_dir=tmp_path, progress=False)
    ref = run_ddp(spec, 12, hooks=Hooks(select=aj.selective_backprop))
    ours = params(tmp_path)
    assert_close(ours, ref["model"], rtol=1e-5)
    for name, value in ref["model"].items():  # BatchNorm's running statistics: the scoring pass left them
        if "running" in name:
            torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_keeping_every_sample_changes_nothing_so_scoring_leaves_no_trace(tmp_path):
    keep_all = aj.spec([PrioritizedSampling(keep=1.0, score="loss")])
    plain = aj.spec([])
    train(keep_all, steps=6, checkpoint_dir=tmp_path / "k", progress=False)
    train(plain, steps=6, checkpoint_dir=tmp_path / "p", progress=False)
    assert_bitwise(params(tmp_path / "k"), params(tmp_path / "p"))  # weights, running stats, RNG-driven dropout


def test_mapd_scored_sampling_backpropagates_the_kept_fraction(tmp_path):
    train(aj.all_three_spec(), steps=aj.STEPS, checkpoint_dir=tmp_path, progress=False)
    train_loss = load_dynamics(tmp_path, "train").loss
    seen = np.isfinite(train_loss).sum(axis=0)  # samples trained on per epoch
    assert (seen == aj.SAMPLES // 2).all()
    state = latest_checkpoint(tmp_path).plugins["plugins"]["prioritized"]
    assert state["backward_samples"] * 2 == state["candidates"] == aj.STEPS * 32


def test_fused_selection_matches_sequential(tmp_path):
    spec = aj.spec([PrioritizedSampling(keep=0.5, score="loss")], model=aj.small_cnn, deterministic=False)
    train(spec, steps=6, checkpoint_dir=tmp_path / "s", progress=False)
    train(dataclasses.replace(spec, execution="fused"), steps=6, checkpoint_dir=tmp_path / "f", progress=False)
    assert_close(params(tmp_path / "f"), params(tmp_path / "s"), rtol=1e-9)


# -- the guarantees ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_three_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("all3")
    train(aj.all_three_spec(), steps=aj.STEPS, checkpoint_dir=run, progress=False)
    return run


@pytest.mark.parametrize("stop", [23, 20], ids=["mid-epoch", "at an epoch's end"])
def test_resumed_from_a_checkpoint_the_run_and_its_decisions_are_bitwise(tmp_path, all_three_dir, stop):
    spec = aj.all_three_spec()
    train(spec, steps=stop, checkpoint_dir=tmp_path, progress=False)
    train(spec, steps=aj.STEPS, checkpoint_dir=tmp_path, progress=False)
    assert_bitwise(params(tmp_path), params(all_three_dir))
    a, b = analyze(tmp_path, write=False), analyze(all_three_dir, write=False)
    for s in SUITES:
        np.testing.assert_array_equal(a.p[s], b.p[s])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bitwise_equal_on_3_workers(tmp_path, all_three_dir):
    train(aj.all_three_spec(), steps=aj.STEPS, checkpoint_dir=tmp_path, workers=3, progress=False)
    assert_bitwise(params(tmp_path), params(all_three_dir))
    np.testing.assert_array_equal(load_dynamics(tmp_path).loss, load_dynamics(all_three_dir).loss)


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("plugins, words", [
    ([MetadataArchaeology()], "DynamicsRecorder() before it"),
    ([DynamicsRecorder(eval_pass=False), MetadataArchaeology()], "eval_pass=False"),
    ([DynamicsRecorder(), LabelCorrection()], "MetadataArchaeology() before it"),
    ([DynamicsRecorder(), PrioritizedSampling()], "MetadataArchaeology() before it"),
    ([PrioritizedSampling(score="loss"), dataclasses.replace(PrioritizedSampling(score="loss"))], "named"),
    ([DynamicsRecorder(), MetadataArchaeology(k=0)], "k=0"),
    ([DynamicsRecorder(), MetadataArchaeology(metric="cosine")], "metric='cosine'"),
    ([DynamicsRecorder(), MetadataArchaeology(suites=("typical", "bogus"))], "suites="),
    ([DynamicsRecorder(), MetadataArchaeology(noise=-1)], "noise=-1"),
    ([DynamicsRecorder(), MetadataArchaeology(), LabelCorrection(warmup_epochs=0)], "warmup_epochs=0"),
    ([PrioritizedSampling(keep=0, score="loss")], "keep=0"),
    ([PrioritizedSampling(score="random")], "score='random'"),
    ([DynamicsRecorder(), MetadataArchaeology(suites=("typical", "atypical")), LabelCorrection()], "mislabeled"),
])
def test_bad_settings_are_refused_before_any_work(plugins, words):
    with pytest.raises(InvalidJobSpec, match=__import__("re").escape(words)):
        aj.spec(plugins).validate()


def test_a_dataset_too_small_for_the_probes_is_refused_with_the_fix(tmp_path):
    spec = aj.spec([DynamicsRecorder(), MetadataArchaeology(probes_per_suite=50)])
    with pytest.raises(InvalidJobSpec, match="probes_per_suite"):
        train(spec, steps=1, checkpoint_dir=tmp_path, progress=False)
