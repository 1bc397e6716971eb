"""Plugins: the recorder against real DDP; observers change nothing; runs with plugins are bitwise
equal on 1, 2 and 3 workers, through a SIGKILL, a join, a master restart, and a kill at any moment."""

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vnodes.runtime import InvalidJobSpec, load_checkpoint, train
from vnodes.runtime.checkpoint import check_checkpoint_dir
from vnodes.runtime.errors import CheckpointMismatch
from vnodes.runtime.plugins import SampleColumns, classification_signals
from vnodes.scheduler.launcher import spawn_worker, start_master
from vnodes.scheduler.plugins import DynamicsRecorder, load_dynamics

from ddp_reference import run_ddp
from jobs import small_cnn, synthetic_images
from plugin_jobs import DATASET, STEPS, LossWeights, mutator_spec, recorder_spec

JOBS = Path(__file__).parent / "plugin_jobs.py"


def tables(run_dir):
    """Every recorded table of a run, as plain arrays (source.signal -> [samples, epochs])."""
    out = {}
    for source in ("eval", "train"):
        dyn = load_dynamics(run_dir, source)
        out.update({f"{source}.{name}": np.array(values) for name, values in dyn.signals.items()})
    return out


def assert_same_run(a_dir, b_dir):
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a["step"] == b["step"] and a["losses"] == b["losses"]
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    ta, tb = tables(a_dir), tables(b_dir)
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if not np.array_equal(ta[k], tb[k], equal_nan=True)] == []


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """The mutator job (recorder included) on one in-process worker: what every run must hit bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(mutator_spec(), steps=STEPS, checkpoint_dir=run_dir, checkpoint_every=4)
    return run_dir


# -- what the recorder records ---------------------------------------------------------------


def test_the_recorder_records_what_real_ddp_computes(tmp_path):
    """Training-pass losses of each sample when DDP saw it, and the end-of-epoch evaluation of every
    sample (loss, true-class probability, margin) of DDP's model: 100 samples, so each epoch drops 4
    (NaN in the training-pass table)."""
    spec = recorder_spec(model=small_cnn, dataset=functools.partial(synthetic_images, n=100),
                         deterministic=False)  # float64
    ref = run_ddp(spec, STEPS, record=True)["dynamics"]
    train(spec, steps=STEPS, checkpoint_dir=tmp_path)
    got, seen = load_dynamics(tmp_path), load_dynamics(tmp_path, "train")
    assert (got.source, got.epochs, got.num_samples, got.loss.shape) == ("eval", 3, 100, (100, 3))
    assert seen.epochs == 3 and np.isnan(seen.loss).sum() == 3 * 4
    np.testing.assert_array_equal(np.isnan(seen.loss), torch.isnan(ref["train"]).numpy())
    np.testing.assert_allclose(seen.loss, ref["train"].numpy(), rtol=1e-6, atol=1e-7, equal_nan=True)
    for name in ("loss", "true_prob", "margin"):
        np.testing.assert_allclose(got.signals[name], ref["eval"][name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isfinite(got.loss).all() and ((got.margin >= -1) & (got.margin <= 1)).all()


def test_classification_signals_against_a_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    signals = classification_signals(logits, torch.tensor([0, 2]))
    p = torch.softmax(logits, dim=1)
    assert torch.allclose(signals["true_prob"], torch.stack([p[0, 0], p[1, 2]]))
    assert torch.allclose(signals["margin"], torch.stack([p[0, 0] - p[0, 1], p[1, 2] - p[1, 1]]))
    assert signals["pred"].tolist() == [0, 1]


def test_an_observer_changes_nothing_and_a_mutator_changes_what_it_declares(tmp_path):
    """The recorder (with its evaluation pass in eval mode, BatchNorm and Dropout in the model) leaves
    the trajectory bitwise as without it; the test mutator's weights change it."""
    plain = train(recorder_spec(plugins=[]), steps=STEPS)
    observed = train(recorder_spec(), steps=STEPS, checkpoint_dir=tmp_path / "observed")
    mutated = train(mutator_spec(), steps=STEPS, checkpoint_dir=tmp_path / "mutated")
    assert observed.losses == plain.losses
    assert [k for k, v in plain.model_state_dict.items() if not torch.equal(observed.model_state_dict[k], v)] == []
    assert mutated.losses[:1] == plain.losses[:1] and mutated.losses[1:] != plain.losses[1:]
    assert LossWeights.changes == {"loss"} and DynamicsRecorder().is_observer and not LossWeights().is_observer


def test_the_checkpoint_holds_the_plugins_state(tmp_path):
    train(mutator_spec(), steps=9, checkpoint_dir=tmp_path, checkpoint_every=3)
    ckpt = load_checkpoint(tmp_path)
    state = ckpt["plugins"]
    assert state["evaluated"] == 1  # the pass of epoch 0 ran at step 6
    assert sorted(state["plugins"]) == ["loss_weights", "recorder"]
    recorder = state["plugins"]["recorder"]
    assert recorder["epochs"] == {"train": 1, "eval": 1} and recorder["row_epoch"] == 1
    seen = ~torch.isnan(recorder["row"]["loss"])  # steps 6, 7, 8 of epoch 1: 3 x 16 samples
    assert int(seen.sum()) == 48
    assert state["plugins"]["loss_weights"]["heavy"].dtype == torch.bool


def test_resuming_with_other_plugins_is_refused_naming_them(tmp_path):
    train(recorder_spec(), steps=4, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatch, match="plugins"):
        train(recorder_spec(plugins=[]), steps=8, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatch, match="plugins"):
        train(recorder_spec(plugins=[DynamicsRecorder(eval_batch_size=16)]), steps=8, checkpoint_dir=tmp_path)


def test_resumed_in_process_the_tables_are_bitwise_those_of_one_run(tmp_path, reference_dir):
    for steps in (5, 6, 13, STEPS):  # stops mid-epoch, at an epoch's end, and across the evaluation passes
        train(mutator_spec(), steps=steps, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert_same_run(tmp_path, reference_dir)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins, field, words", [
    (["recorder"], "plugins", "not a vnodes plugin"),
    ([DynamicsRecorder(), DynamicsRecorder()], "plugins", "unique"),
    ([DynamicsRecorder(eval_batch_size=0)], "plugins", "eval_batch_size=0"),
    ([DynamicsRecorder(signals="loss")], "plugins", "signals"),
])
def test_bad_plugins_are_refused_before_any_work(plugins, field, words):
    with pytest.raises(InvalidJobSpec, match=words) as info:
        recorder_spec(plugins=plugins).validate()
    assert info.value.field == field


def test_plugins_with_cuda_graphs_are_refused():
    with pytest.raises(InvalidJobSpec, match="per-sample losses"):
        recorder_spec(execution="fused", deterministic=False, cuda_graphs=True).validate()


def test_load_dynamics_without_a_recording_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="DynamicsRecorder"):
        load_dynamics(tmp_path)
    train(recorder_spec(plugins=[DynamicsRecorder(eval_pass=False)]), steps=6, checkpoint_dir=tmp_path)
    assert load_dynamics(tmp_path).source == "train"
    with pytest.raises(ValueError, match="'eval' was not recorded"):
        load_dynamics(tmp_path, "eval")


def test_malformed_reports_are_refused_by_name():
    from vnodes.protos import pack_samples, unpack_samples
    from vnodes.protos import vnodes_pb2 as pb

    message = pb.PluginData()
    pack_samples(message, "recorder", np.arange(3), {"loss": np.ones(3, np.float32)})
    plugin, indices, columns = unpack_samples(message)
    assert plugin == "recorder" and indices.tolist() == [0, 1, 2] and columns["loss"].tolist() == [1, 1, 1]
    message.columns[0].data = message.columns[0].data[:-1]
    with pytest.raises(ValueError, match="11 bytes for 3 rows"):
        unpack_samples(message)
    message.columns[0].dtype = "O"
    with pytest.raises(ValueError, match="dtype"):
        unpack_samples(message)
    with pytest.raises(ValueError, match="one value per sample"):
        SampleColumns(np.arange(3), {"loss": np.ones(2)})


# -- real processes ------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 3])
def test_bitwise_equal_on_2_and_3_workers(tmp_path, reference_dir, workers):
    train(mutator_spec(), steps=STEPS, checkpoint_dir=tmp_path, checkpoint_every=4, workers=workers)
    assert_same_run(tmp_path, reference_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bitwise_through_a_sigkill_and_a_join(tmp_path, reference_dir):
    """Three workers; worker 1 is SIGKILLed after its forward pass of step 4 (the survivors redo it);
    then a new worker joins."""
    handle = start_master(mutator_spec(), STEPS, check_checkpoint_dir(tmp_path), expected_workers=3,
                          checkpoint_every=4, start_grace_s=60)
    slow = ("--slowdown", "30")
    procs = [spawn_worker(handle.address, i, env={"VNODES_FAULT": "loss_computed:4:1"}, extra_args=slow)
             for i in range(3)]
    try:
        assert procs[1].wait(timeout=120) == -signal.SIGKILL
        procs.append(spawn_worker(handle.address, 3, extra_args=slow))
        assert handle.master.wait(lambda m: m.done or any(w.launch_index == 3 and w.state.value == "member"
                                                          for w in m.workers.values()), timeout_s=120)
        assert handle.master.wait(lambda m: m.done, timeout_s=180)
        handle.wait_for_end()
        assert [p.wait(timeout=60) for i, p in enumerate(procs) if i != 1] == [0, 0, 0]
        assert handle.master.epoch_counter >= 3  # formed, re-formed after the kill, and after the join
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        handle.stop()
    assert_same_run(tmp_path, reference_dir)


def vnodes(*args, env=None):
    env = dict(env or os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "vnodes.scheduler.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bitwise_through_a_master_restart(tmp_path, reference_dir):
    """The master is SIGKILLed past its checkpoint of step 8 and restarted on its run directory; the
    workers reconnect, and the job (its plugins' state known at checkpoints) resumes from step 8."""
    from test_master_restart import committed_step, free_port, wait_for

    port = free_port()
    master_args = ("master", f"{JOBS}:mutator_spec", "--steps", str(STEPS), "--port", str(port), "--run-dir",
                   str(tmp_path), "--min-workers", "2", "--checkpoint-every", "4")
    master = vnodes(*master_args)
    workers = [vnodes("worker", "--master", f"127.0.0.1:{port}", "--slowdown", "6", "--master-timeout", "30")
               for _ in range(2)]
    try:
        wait_for(lambda: committed_step(tmp_path) >= 10, timeout_s=120)
        master.send_signal(signal.SIGKILL)
        master.wait()
        time.sleep(0.5)
        master = vnodes(*master_args)
        out, err = master.communicate(timeout=180)
        assert master.returncode == 0, err.decode()[-3000:]
        assert [w.wait(timeout=60) for w in workers] == [0, 0]
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
    assert_same_run(tmp_path, reference_dir)


@pytest.mark.slow
def test_killed_at_any_moment_and_resumed_the_run_and_its_dynamics_are_bitwise(tmp_path, reference_dir):
    """``vnodes run`` (one in-process worker) SIGKILLed inside an evaluation pass, a forward pass, a
    checkpoint write and a commit, each time resumed: the final parameters and every recorded table
    are those of one uninterrupted run."""
    for fault in ("eval_start:6", "loss_computed:9", "checkpoint_staged:11", "step_committed:12", "reduced:16"):
        env = dict(os.environ, VNODES_FAULT=fault)
        proc = vnodes("run", f"{JOBS}:mutator_spec", "--steps", str(STEPS), "--checkpoint-dir", str(tmp_path),
                      "--checkpoint-every", "4", "--no-progress", env=env)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (fault, err.decode()[-2000:])
    proc = vnodes("run", f"{JOBS}:mutator_spec", "--steps", str(STEPS), "--checkpoint-dir", str(tmp_path),
                  "--checkpoint-every", "4", "--no-progress")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert_same_run(tmp_path, reference_dir)


def test_the_command_line_enables_the_recorder(tmp_path):
    proc = vnodes("run", f"{JOBS}:plain_spec", "--steps", "12", "--checkpoint-dir", str(tmp_path), "--no-progress",
                  "--plugin", "recorder")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    dyn = load_dynamics(tmp_path)
    assert (dyn.source, dyn.epochs, dyn.loss.shape) == ("eval", 2, (DATASET, 2)) and np.isfinite(dyn.loss).all()
    # recorder_spec has one already: a second is refused by name, before any work
    proc = vnodes("run", f"{JOBS}:recorder_spec", "--steps", "12", "--no-progress", "--plugin", "recorder")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and b"unique" in err, err.decode()[-2000:]


def test_fused_execution_shows_plugins_each_node_s_samples(tmp_path):
    """Fused groups interleave their nodes' rows; the plugins still see (and the mutator still
    weights) each node's own samples: fused equals sequential within float64 rounding."""
    tables_of = {}
    for execution in ("sequential", "fused"):
        run_dir = tmp_path / execution
        spec = mutator_spec(model=small_cnn, deterministic=False, execution=execution, fused_group_size=2)
        result = train(spec, steps=STEPS, checkpoint_dir=run_dir)
        tables_of[execution] = (tables(run_dir), result)
    (seq, seq_result), (fused, fused_result) = tables_of["sequential"], tables_of["fused"]
    assert sorted(seq) == sorted(fused)
    for name in seq:
        np.testing.assert_allclose(fused[name], seq[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for k, v in seq_result.model_state_dict.items():
        assert torch.allclose(fused_result.model_state_dict[k], v, rtol=1e-9, atol=1e-12), k
