"""What a real training script needs, each against real DDP with the same setting: any batch through
``step_fn`` (a Hugging Face-style model: dict batches, an attention mask, outputs with ``.logits``),
bf16 autocast, fp16 with one global gradient scaler (a forced overflow skips the step everywhere),
gradient clipping on the reduced gradient, parameter groups by name; and bitwise equality across
worker counts in deterministic mode."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from torch import nn

from vnodes.runtime import InvalidJobSpec, JobSpec, train
from vnodes.runtime.engine import StepEngine
from vnodes.runtime.events import Callback

from ddp_reference import run_ddp
from jobs import cnn_spec, per_sample_ce, small_cnn, small_mlp, text_spec, text_step, text_step_with_metrics

STEPS = 6

# A plateau that reduces whenever the evaluation loss falls (mode="max"): it acts within a few steps.
_plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", factor=0.5, patience=0)


class Record(Callback):
    def __init__(self):
        self.grad_norms, self.skipped, self.lrs, self.metrics = [], [], [], []

    def on_step_end(self, state):
        self.metrics.append(dict(state.metrics))
        self.grad_norms.append(state.grad_norm)
        self.skipped.append(state.skipped)
        self.lrs.append(state.lr)


def _vnodes(spec, steps=STEPS, **kw):
    record = Record()
    result = train(spec, steps=steps, callbacks=[record], **kw)
    return result, record


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            worst = max(worst, float((v.double() - b[k].double()).abs().max() / (b[k].double().abs().max() + 1e-12)))
    return worst


@pytest.mark.multiprocess
@pytest.mark.slow
def test_step_fn_bf16_clipping_and_param_groups_match_real_ddp():
    """The text classifier through step_fn (dict batches, model(**inputs).logits), under bf16
    autocast, AdamW with weight decay excluded from biases, norms and embeddings by name, the
    reduced gradient clipped to 0.5: the losses, gradient norms and parameters of 4 virtual nodes
    on one worker are those of 4-process DDP with the same autocast, groups and clip_grad_norm_;
    step_fn's per-sample metrics are the ranks' means averaged, as an all_reduce gives them."""
    spec = text_spec(precision="bf16", clip_grad_norm=0.5, step_fn=text_step_with_metrics)
    ddp = run_ddp(spec, STEPS)
    result, record = _vnodes(spec)
    assert [set(m) for m in record.metrics] == [{"accuracy", "true_prob"}] * STEPS
    for ours, theirs in zip(record.metrics, ddp["metrics"]):
        assert ours == pytest.approx(theirs, rel=1e-4)
    assert result.losses == pytest.approx(ddp["losses"], rel=1e-4)
    assert record.grad_norms == pytest.approx(ddp["grad_norms"], rel=1e-4)
    assert max(ddp["grad_norms"]) > 0.5  # the clip bit: a test where nothing is clipped could not fail
    assert _max_rel(result.model_state_dict, ddp["model"]) < 1e-4
    assert record.lrs == [3e-3] * STEPS and record.skipped == [False] * STEPS


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fp16_overflow_skips_the_step_everywhere_as_ddp_with_gradscaler_does():
    """An initial scale of 2**22 overflows fp16: the first steps are skipped (parameters unchanged,
    the scale backs off) exactly where DDP with torch.amp.GradScaler on every rank skips them."""
    spec = text_spec(precision="fp16", grad_scaler={"init_scale": 2.0 ** 22, "growth_interval": 3})
    ddp = run_ddp(spec, STEPS)
    result, record = _vnodes(spec)
    assert record.skipped == ddp["skipped"]
    assert 1 <= sum(record.skipped) < STEPS  # some overflowed, then training went on
    norms = [float("nan") if n is None else n for n in record.grad_norms]
    assert [math.isfinite(n) for n in norms] == [not s for s in record.skipped]  # inf/NaN exactly where skipped
    assert result.losses == pytest.approx(ddp["losses"], rel=1e-3)
    assert _max_rel(result.model_state_dict, ddp["model"]) < 1e-3


@pytest.mark.multiprocess
@pytest.mark.slow
def test_clipping_matches_ddp_in_float64_and_the_settings_are_bitwise_across_worker_counts(tmp_path):
    """The CNN in float64 with SGD and clip_grad_norm=0.05: within 1e-9 of DDP with clip_grad_norm_;
    then deterministic, on 1 and 2 worker processes, with fp16 and clipping: the same bits, the
    scale included (it is part of the checkpoint)."""
    spec = cnn_spec(clip_grad_norm=0.05)
    ddp = run_ddp(spec, STEPS)
    result, record = _vnodes(spec)
    assert record.grad_norms == pytest.approx(ddp["grad_norms"], rel=1e-9)
    assert min(ddp["grad_norms"]) > 0.05
    assert _max_rel(result.model_state_dict, ddp["model"]) < 1e-9

    det = text_spec(precision="fp16", clip_grad_norm=1.0, deterministic=True, step_fn=text_step_with_metrics,
                    grad_scaler={"init_scale": 2.0 ** 20, "growth_interval": 2})
    one = train(det, steps=STEPS, checkpoint_dir=tmp_path / "one")
    two = train(det, steps=STEPS, checkpoint_dir=tmp_path / "two", workers=2)
    assert [k for k, v in one.model_state_dict.items() if not torch.equal(v, two.model_state_dict[k])] == []
    assert one.losses == two.losses
    from vnodes.runtime import load_checkpoint

    scales = [load_checkpoint(tmp_path / d)["grad_scaler"] for d in ("one", "two")]
    assert scales[0] == scales[1] and scales[0]["scale"] != 2.0 ** 20  # it moved, identically
    from vnodes.scheduler.metrics_stream import read_metrics

    streams = [[r["metrics"] for r in read_metrics(tmp_path / d) if "event" not in r] for d in ("one", "two")]
    assert len(streams[0]) == STEPS and streams[0] == streams[1]  # step_fn's metrics: the same bits


def test_param_groups_reach_the_optimizer_and_the_default_is_unchanged():
    engine = StepEngine.build(text_spec())
    groups = engine.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = {id(p): n for n, p in engine.model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == sorted(
        n for n, _ in engine.model.named_parameters() if n.endswith("bias") or "norm" in n or "embed" in n)
    plain = StepEngine.build(cnn_spec())
    assert len(plain.optimizer.param_groups) == 1


def test_the_new_fields_stay_out_of_the_fingerprint_at_their_defaults():
    """So checkpoints written before these fields existed still resume."""
    base = cnn_spec().fingerprint()
    assert not set(base) & set(JobSpec.OPTIONAL_TRAJECTORY_FIELDS)
    for change in ({"precision": "bf16"}, {"clip_grad_norm": 1.0}):
        assert set(cnn_spec(**change).fingerprint()) - set(base) == set(change)


@pytest.mark.parametrize("changes, field, message", [
    ({"loss": None}, "loss", "is missing: pass loss="),
    ({"step_fn": text_step}, "step_fn", "set one of loss and step_fn"),
    ({"precision": "fp8"}, "precision", "must be one of"),
    ({"grad_scaler": {"init_scale": 2.0}}, "grad_scaler", "precision='fp16'"),
    ({"precision": "fp16", "grad_scaler": {"init": 2.0}}, "grad_scaler", "must be a dict of"),
    ({"precision": "fp16", "grad_scaler": {"backoff_factor": 2.0}}, "grad_scaler", "out of range"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm", "positive finite number"),
    ({"clip_grad_norm": float("inf")}, "clip_grad_norm", "positive finite number"),
    ({"param_groups": "decay"}, "param_groups", "must be a callable"),
    ({"compile": "yes"}, "compile", "must be True, False or a dict"),
    ({"compile": {"fullgraph": True, "modes": "max-autotune"}}, "compile", r"\['modes'\] is not"),
    ({"compile": True, "execution": "fused", "cuda_graphs": True}, "compile", "both capture the step"),
    ({"lr_scheduler_metric": "loss"}, "lr_scheduler_metric", "there is no lr_scheduler"),
    ({"lr_scheduler_metric": "loss", "lr_scheduler": _plateau}, "lr_scheduler_metric", "does not evaluate"),
    ({"lr_scheduler_metric": 3}, "lr_scheduler_metric", "must be None or the name"),
])
def test_bad_settings_are_refused_naming_the_field(changes, field, message):
    with pytest.raises(InvalidJobSpec, match=message) as info:
        cnn_spec(**changes).validate()
    assert info.value.field == field


def test_step_fn_with_plugins_or_a_wrong_shape_is_refused():
    from vnodes.scheduler.plugins import DynamicsRecorder

    with pytest.raises(InvalidJobSpec, match="step_fn does not expose"):
        text_spec(plugins=[DynamicsRecorder()]).validate()
    bad = text_spec(step_fn=functools.partial(_summed, text_step))
    with pytest.raises(InvalidJobSpec, match=r"step_fn: must return one loss per sample \(shape \[6\]\), got \[\]"):
        train(bad, steps=1)


def _summed(step_fn, model, batch):
    return step_fn(model, batch).sum()


def test_step_fn_runs_fused_where_the_modules_allow():
    """A model without cross-sample modules fuses; fused equals sequential within float rounding."""
    spec = cnn_spec(model=functools.partial(small_cnn, torch.float64), loss=None,
                    step_fn=_pair_step, clip_grad_norm=1.0)
    sequential, seq_record = _vnodes(spec, steps=3)
    fused, fused_record = _vnodes(dataclasses.replace(spec, execution="fused"), steps=3)
    assert _max_rel(fused.model_state_dict, sequential.model_state_dict) < 1e-9
    assert [set(m) for m in seq_record.metrics] == [{"margin"}] * 3
    for a, b in zip(fused_record.metrics, seq_record.metrics):  # each node's mean, from interleaved rows
        assert a == pytest.approx(b, rel=1e-9)


def _pair_step(model, batch):
    x, y = batch
    logits = model(x)
    top2 = logits.topk(2, dim=1).values
    return per_sample_ce(logits, y), {"margin": (top2[:, 0] - top2[:, 1]).detach()}


def _bad_metrics(model, batch):
    loss, metrics = _pair_step(model, batch)
    return loss, {"margin": metrics["margin"].mean()}


def test_step_fn_metrics_that_are_not_per_sample_are_refused():
    bad = cnn_spec(loss=None, step_fn=_bad_metrics)
    with pytest.raises(InvalidJobSpec, match=r"metric 'margin' must hold one value per sample, as the loss "
                                             r"\(shape \[8\]\), got \[\]"):
        train(bad, steps=1)


# ---- the metrics stream and the loggers ----------------------------------------------------------------

def test_the_metrics_stream_has_one_row_per_applied_step_and_the_loggers_write_the_same(tmp_path):
    """One worker, then a resume on two: metrics.jsonl holds a row per step (the resumed run drops
    nothing before its checkpoint and repeats nothing), with the membership changes; the CSV and
    TensorBoard loggers get the same numbers from the driver."""
    from vnodes.runtime.loggers import CSVLogger, TensorBoardLogger
    from vnodes.scheduler.metrics_stream import read_metrics

    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    spec = cnn_spec(clip_grad_norm=1.0)
    first, record = _vnodes(spec, steps=3, checkpoint_dir=run,)
    csv_logger, tb = CSVLogger(tmp_path / "m.csv"), TensorBoardLogger(tmp_path / "tb")
    train(spec, steps=5, checkpoint_dir=run, callbacks=[csv_logger, tb])
    rows = read_metrics(run)
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["grad_norm"] for r in steps[:3]] == record.grad_norms
    assert all(r["lr"] == 0.1 and r["skipped"] is False and r["samples_per_s"] > 0 and r["loss_spread"] >= 0
               for r in steps)
    assert [r["loss"] for r in steps] == pytest.approx(train(spec, steps=5).losses, rel=1e-12)
    assert [(r["event"], r["step"], r["workers"]) for r in rows if "event" in r] == \
        [("membership", 0, 1), ("membership", 3, 1)]

    import csv

    with open(tmp_path / "m.csv") as f:
        logged = list(csv.DictReader(f))
    assert [int(r["step"]) for r in logged] == [4, 5]
    assert [float(r["grad_norm"]) for r in logged] == pytest.approx([r["grad_norm"] for r in steps[3:]])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(4, pytest.approx(steps[3]["loss"], rel=1e-6)), (5, pytest.approx(steps[4]["loss"], rel=1e-6))]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_vnodes_run_log_tensorboard_with_two_workers_logs_each_step_once(tmp_path):
    """Two worker processes, one master: every step appears once in metrics.jsonl and once in
    TensorBoard (the driver logs; workers never do)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vnodes.scheduler.metrics_stream import read_metrics

    run = tmp_path / "run"
    job = f"{Path(__file__).parent / 'jobs.py'}:cnn_spec"
    out = subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", "run", job, "--steps", "6", "--workers", "2",
                          "--run-dir", str(run), "--log", "tensorboard", "--log", "csv", "--no-progress"],
                         capture_output=True, text=True, timeout=180,
                         env={**__import__("os").environ, "PYTHONPATH": __import__("os").pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [r for r in read_metrics(run) if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and {r["workers"] for r in steps} <= {1, 2}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/grad_norm")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events.Scalars("train/grad_norm")] == pytest.approx([r["grad_norm"] for r in steps])
    assert (run / "metrics.csv").read_text().count("\n") == 7  # a header and six rows


def test_log_names_are_checked_before_training():
    from vnodes.runtime.errors import VnodesError
    from vnodes.runtime.loggers import logger_named

    with pytest.raises(VnodesError, match="pass --run-dir D"):
        logger_named("csv", None)
    with pytest.raises(VnodesError, match="is not a logger"):
        logger_named("wandb", "/tmp/x")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(VnodesError, match="pip install mlflow"):
            logger_named("mlflow", None)


# ---- evaluation ----------------------------------------------------------------------------------------

def _accuracy(outputs, targets):
    return {"loss": per_sample_ce(outputs, targets), "accuracy": (outputs.argmax(1) == targets).double()}


def _eval_spec(**changes):
    from jobs import synthetic_images

    return cnn_spec(eval_dataset=functools.partial(synthetic_images, 50, 99), eval_every=2, deterministic=True,
                    eval_metrics=_accuracy, **changes)


def _reference_evaluation(model_state: dict, step: int) -> dict:
    """The evaluation written by hand: the trained weights, eval mode, every sample once."""
    from jobs import synthetic_images

    model = small_cnn()
    model.load_state_dict(model_state)
    model.eval()
    data = synthetic_images(50, 99)
    x, y = data.tensors
    with torch.no_grad():
        metrics = _accuracy(model(x.double()), y)
    return {"step": step, **{k: float(v.mean()) for k, v in metrics.items()}}


def test_evaluation_is_what_a_hand_written_one_computes_and_changes_no_training_bit(tmp_path):
    """Every 2 steps and after the last: sharded over the virtual nodes in eval mode, it equals
    evaluating the trained weights by hand; the training run is bitwise the run without evaluation
    (running statistics and random streams untouched)."""
    spec = _eval_spec()
    seen = []

    class Seen(Callback):
        def on_evaluated(self, state):
            seen.append((state.evaluation_step, state.step, dict(state.evaluation)))

    result = train(spec, steps=5, callbacks=[Seen()])
    plain = dataclasses.replace(spec, eval_dataset=None, eval_every=None, eval_metrics=None)
    assert [e["step"] for e in result.evaluations] == [2, 4, 5]
    for step, evaluation in zip((2, 4, 5), result.evaluations):
        at_step = train(plain, steps=step).model_state_dict
        assert evaluation == pytest.approx(_reference_evaluation(at_step, step), rel=1e-12)
    without = train(plain, steps=5)
    assert [k for k, v in without.model_state_dict.items() if not torch.equal(v, result.model_state_dict[k])] == []
    assert without.losses == result.losses
    # callbacks hear each evaluation once, before the step that follows it
    assert [(s, applied) for s, applied, _ in seen] == [(2, 2), (4, 4), (5, 5)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluations_are_exact_on_two_workers_through_a_resume_and_in_the_stream(tmp_path):
    from vnodes.runtime import load_checkpoint
    from vnodes.scheduler.metrics_stream import read_metrics

    spec = _eval_spec()
    one = train(spec, steps=5)  # evaluations at 2, 4 and 5
    ended_at_3 = train(spec, steps=3).evaluations[-1]  # a run of 3 steps evaluates after its last
    run = tmp_path / "run"
    train(spec, steps=3, checkpoint_dir=run, workers=2)  # two worker processes...
    resumed = train(spec, steps=5, checkpoint_dir=run)  # ...then one, in this process
    expected = [one.evaluations[0], ended_at_3, *one.evaluations[1:]]
    assert resumed.evaluations == expected  # exactly, not approximately
    assert load_checkpoint(run)["evaluations"] == expected
    rows = [r for r in read_metrics(run) if r.get("event") == "evaluation"]
    assert [r["metrics"] for r in rows] == expected and {r["samples"] for r in rows} == {50}


def test_bad_evaluation_settings_are_refused():
    from jobs import synthetic_images

    with pytest.raises(InvalidJobSpec, match="set eval_dataset=build_eval_dataset too"):
        cnn_spec(eval_every=3).validate()
    with pytest.raises(InvalidJobSpec, match="eval_every: must be None or an integer >= 1"):
        cnn_spec(eval_dataset=synthetic_images, eval_every=0).validate()
    bad = cnn_spec(eval_dataset=functools.partial(synthetic_images, 50, 99), eval_metrics=_not_per_sample)
    with pytest.raises(InvalidJobSpec, match=r"metric 'loss' must hold one value per sample"):
        train(bad, steps=1)


def _not_per_sample(outputs, targets):
    return {"loss": per_sample_ce(outputs, targets).mean()}


def test_a_resumed_run_reports_only_its_own_evaluations_and_keeps_the_earlier_ones(tmp_path):
    """Callbacks hear an evaluation once: the resumed run does not fire the checkpoint's again."""
    from vnodes.scheduler.metrics_stream import read_metrics

    spec = _eval_spec()
    heard = []

    class Heard(Callback):
        def on_evaluated(self, state):
            heard.append(state.evaluation_step)

    train(spec, steps=3, checkpoint_dir=tmp_path, callbacks=[Heard()])
    result = train(spec, steps=5, checkpoint_dir=tmp_path, callbacks=[Heard()])
    assert heard == [2, 3, 4, 5]
    assert [e["step"] for e in result.evaluations] == [2, 3, 4, 5]
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("event") == "evaluation"] == [2, 3, 4, 5]


# ---- a scheduler stepping on the evaluation; torch.compile -----------------------------------------

@pytest.mark.multiprocess
@pytest.mark.slow
def test_reduce_lr_on_plateau_steps_on_the_evaluation_as_in_a_ddp_loop(tmp_path):
    """ReduceLROnPlateau on the evaluation loss, every 2 steps: what 4-process DDP computes with
    ``scheduler.step(evaluate())`` at the top of the loop (weights within 1e-9, the same learning
    rates); on 2 workers, and resumed from a run that ended at an evaluation, the same bits."""
    spec = _eval_spec(lr_scheduler=_plateau, lr_scheduler_metric="loss")
    ddp = run_ddp(spec, STEPS)
    result, record = _vnodes(spec)
    assert min(ddp["lrs"]) < 0.1  # the plateau acted (a test where it never does could not fail)
    # The reported rate is read at the reduce, before the plateau steps on that step's evaluation
    # (steps 2 and 4): there a change shows from the next step on. The weights say what was applied.
    assert [lr for s, lr in enumerate(record.lrs) if s not in (2, 4)] == \
        [lr for s, lr in enumerate(ddp["lrs"]) if s not in (2, 4)]
    assert _max_rel(result.model_state_dict, ddp["model"]) < 1e-9
    assert [e["step"] for e in result.evaluations] == [2, 4, 6]

    two = train(spec, steps=STEPS, workers=2)
    assert [k for k, v in two.model_state_dict.items() if not torch.equal(v, result.model_state_dict[k])] == []
    train(spec, steps=4, checkpoint_dir=tmp_path)  # ends with the evaluation of step 4, which it steps on
    resumed = train(spec, steps=STEPS, checkpoint_dir=tmp_path)
    assert [k for k, v in resumed.model_state_dict.items() if not torch.equal(v, result.model_state_dict[k])] == []


def test_a_plateau_scheduler_needs_its_metric_named_and_the_name_must_exist():
    with pytest.raises(InvalidJobSpec, match="ReduceLROnPlateau steps on a metric") as info:
        StepEngine.build(_eval_spec(lr_scheduler=_plateau))
    assert info.value.field == "lr_scheduler_metric"
    with pytest.raises(InvalidJobSpec, match=r"'acc' is not an evaluation metric; the evaluation computes "
                                             r"\['accuracy', 'loss'\]"):
        train(_eval_spec(lr_scheduler=_plateau, lr_scheduler_metric="acc"), steps=3)


def _mlp_without_dropout():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).double()


_GRAPHS: list = []


def _recording_backend(gm, example_inputs):
    """A torch.compile backend that keeps what it was given and runs it as traced."""
    _GRAPHS.append(gm)
    return gm.forward


@pytest.mark.parametrize("execution,model", [("sequential", small_mlp), ("fused", _mlp_without_dropout)])
def test_compile_captures_a_model_whose_forward_is_torch_nns_own_as_one_graph(execution, model):
    """``nn.Module.compile`` compiles ``_call_impl``, a frame dynamo skips: a root whose forward is
    torch.nn's (here an ``nn.Sequential`` of torch.nn modules) was never compiled (fused: only the
    patched BatchNorm was), and a Sequential of user blocks became a graph per block. The engine
    compiles ``forward`` from a frame of its own: the whole model is one graph, both Linear layers in
    it (fused: without Dropout, whose per-node streams break the graph)."""
    torch._dynamo.reset()
    _GRAPHS.clear()
    train(cnn_spec(model=model, compile={"backend": _recording_backend}, execution=execution), steps=2)
    assert len(_GRAPHS) == 1, [g.code for g in _GRAPHS]
    code = _GRAPHS[0].code
    assert code.count("linear") >= 2 and "batch_norm" in code, code


@pytest.mark.slow
def test_compile_keeps_the_ddp_trajectory_sequential_and_fused_and_is_bitwise_across_workers(tmp_path):
    """compile=True (inductor, on this CPU): an MLP in float64 with BatchNorm and Dropout stays
    within 1e-9 of eager 4-process DDP, run sequentially and fused; deterministic, 1 and 2 worker
    processes compute the same bits; checkpoints hold the plain model's keys."""
    spec = cnn_spec(model=small_mlp)
    ddp = run_ddp(spec, 4)
    for execution in ("sequential", "fused"):
        result = train(dataclasses.replace(spec, compile=True, execution=execution), steps=4)
        assert result.losses == pytest.approx(ddp["losses"], rel=1e-9)
        assert _max_rel(result.model_state_dict, ddp["model"]) < 1e-9, execution
    det = cnn_spec(model=small_mlp, compile=True, deterministic=True)
    one = train(det, steps=3, checkpoint_dir=tmp_path / "one")
    two = train(det, steps=3, checkpoint_dir=tmp_path / "two", workers=2)
    assert [k for k, v in one.model_state_dict.items() if not torch.equal(v, two.model_state_dict[k])] == []
    assert set(one.model_state_dict) == set(small_mlp().state_dict())  # no "_orig_mod." prefix
    assert "compile" in det.fingerprint() and "compile" not in cnn_spec(compile=True).fingerprint()
