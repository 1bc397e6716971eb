"""What metadata archaeology buys: finding mislabeled samples, correcting them, and skipping backward
passes, against the usual baselines, on the same model and budget.

    python benchmarks/archaeology.py            # 3 seeds, digits and MNIST-1D: about 17 minutes on 2 CPU cores
    python benchmarks/archaeology.py --smoke    # 1 seed, digits, 6 epochs: under 2 minutes; checks the script

**Data** (nothing is downloaded). scikit-learn's ``load_digits`` (1,797 samples, 64 features, 10
classes), split 80/20 stratified with a fixed split seed (0): 1,437 training, 360 test samples.
MNIST-1D generated in process (``make_dataset(get_dataset_args())``, never its download path): 4,000
training, 1,000 test samples of 40 features, 10 classes. Features standardised with the training
split's mean and standard deviation (a constant feature is left at 0).

**Label noise.** A seeded fraction (exactly ``round(noise x N)`` training samples, drawn by
``(seed, noise, dataset)``) gets ``y -> (y + r) mod 10``, ``r`` uniform in 1..9: the class always
changes. The noisy labels are the job's dataset (``noisy_train``: a ``TensorDataset``); the flip
mask scores detection. Test labels are never altered.

**Model and budget**, the same for every method of a dataset: an MLP with ReLU, digits 64-128-10 for
30 epochs, MNIST-1D 40-256-256-10 for 40 epochs; Adam (lr 1e-3), per-sample cross-entropy; trained
with vnodes ``train()`` in process (1 worker), 8 virtual nodes x 16 samples per step (a global
batch of 128: 11 steps per epoch on digits, 31 on MNIST-1D), fast mode, one intra-op thread.
``--smoke``: digits, 6 epochs.

**(a) Mislabeled detection** at 20% and 40% noise: AUROC (``roc_auc_score``) and precision at K,
K = the number of flipped samples, over the samples that are not MAP-D probes (their indices:
``analyze(run).probes``; the same set for every method of a seed). Precision at K under ties is the
expected precision with ties broken at random (MAP-D's p(mislabeled) takes k + 1 = 21 values).
Methods, by cost in training runs:

- MAP-D, Euclidean and DTW: ``analyze(run_dir, metric=..., write=False).p["mislabeled"]`` of one run
  with ``[DynamicsRecorder(signals=signals), MetadataArchaeology()]``; besides the run, the
  consistency proxy's 8 linear fits (its time is in the table);
- from the same run's recording (``load_dynamics``; the probes altered ~20% of the training set,
  which is the price of sharing the run): the last epoch's loss and the mean loss over epochs
  (evaluation pass), Data Maps' confidence (Swayamdipta et al. 2020: mean true-class probability
  over epochs, evaluation pass; score = -confidence), AUM (Pleiss et al. 2020: mean over epochs of
  the logit margin, assigned logit minus the largest other, from the training pass as the paper
  takes it; score = -AUM);
- cleanlab (``find_label_issues`` / ``get_label_quality_scores``, self-confidence) on out-of-fold
  probabilities of 4-fold cross-validation (stratified, seeded): the same model and epoch budget
  trained with vnodes on each fold's complement (``torch.utils.data.Subset``): 4 runs. AUROC from
  ``-get_label_quality_scores``; precision at K from the first K of ``find_label_issues(...,
  return_indices_ranked_by="self_confidence")`` restricted to non-probes, or the whole flagged set
  when it is shorter (the table gives the mean flagged count).

Target: each MAP-D variant at least as good as the best baseline (mean over seeds), per dataset,
noise level and metric.

**(b) Label correction** at 40% noise: clean test accuracy at the end of training, plain
cross-entropy (no plugins) against ``[DynamicsRecorder(), MetadataArchaeology(), LabelCorrection(warmup_epochs=...)]``
(default warm-up: max(2, epochs // 5) epochs). Target: at least +5 points (mean over seeds).

**(c) Prioritized sampling** on clean labels: plain training against ``PrioritizedSampling(keep=0.25)``
with ``score="mapd"`` (after the recorder and archaeology) and ``score="loss"`` (selective
backprop, beta 1; a ``DynamicsRecorder(eval_pass=False)`` before it records which samples it
chose). The candidate batch is 4x the plain one (8 virtual nodes x 64 candidates, 16 backpropagated
each), so every step backpropagates 128 samples as plain does, and every run takes as many steps as
plain's budget. Test accuracy at every checkpoint (one per plain epoch: ``checkpoint_every`` = plain's
steps per epoch); reported: backpropagated samples (steps x 8 x 16; plain's own count to the same
target is measured the same way) and wall-clock time from the ``train()`` call (probe building,
scoring forwards, evaluation passes and checkpoints included) until the first checkpoint at or
above plain's final test accuracy, per seed. Target: at least 2x fewer backpropagated samples than
plain needs for the same accuracy. Then at 20% noise: the fraction of backpropagated samples that
were flipped (the recorder's ``"train"`` source is finite exactly for the chosen samples), over
the non-probe samples of the MAP-D run of that seed, for both scores.

Seeds (``--seeds``, default 0,1,2) fix the label noise, the job (initial weights, data order,
probes) and the folds; the train/test split of digits is fixed. Every figure is a mean +- standard
deviation over seeds. The machine may be shared: wall-clock times are indicative only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from vnodes.runtime import Callback, JobSpec, RunState, VNodeSampler, train

from machine import header
from vnodes.runtime.checkpoint import latest_checkpoint, list_checkpoints
from vnodes.scheduler.plugins import (DynamicsRecorder, LabelCorrection, MetadataArchaeology, PrioritizedSampling,
                                      analyze, load_dynamics)
from vnodes.scheduler.plugins import archaeology as archaeology_module

CLASSES = 10
VNODES, VNODE_BATCH = 8, 16
LR = 1e-3
KEEP = 0.25  # prioritized sampling: backpropagate a quarter of a 4x larger candidate batch
FOLDS = 4  # cleanlab's cross-validation
SPLIT_SEED = 0  # the digits train/test split
DETECT_NOISE = (0.2, 0.4)
CORRECT_NOISE = 0.4
SELECT_NOISE = 0.2
TARGET_CORRECTION_POINTS = 5.0
TARGET_BACKWARD_RATIO = 2.0
PARTS = ("a", "b", "c")


@dataclasses.dataclass(frozen=True)
class Recipe:
    hidden: tuple[int, ...]
    epochs: int


RECIPES = {"digits": Recipe((128,), 30), "mnist1d": Recipe((256, 256), 40)}


# -- the job (module level: JobSpec checks that its callables pickle) -------------------------------

@functools.lru_cache(maxsize=None)
def splits(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``, features standardised by the training split's statistics."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())  # generated in process: never the download path
        x_train, y_train, x_test, y_test = data["x"], data["y"], data["x_test"], data["y_test"]
    else:
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(RECIPES)}")
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # digits has pixels that are always 0
    def features(x: np.ndarray) -> torch.Tensor:
        return torch.tensor((x - mean) / std, dtype=torch.float32)

    def labels(y) -> torch.Tensor:
        return torch.tensor(np.asarray(y), dtype=torch.int64)

    return features(x_train), labels(y_train), features(x_test), labels(y_test)


@functools.lru_cache(maxsize=None)
def flips(name: str, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy labels, flipped mask)``: exactly ``round(noise * N)`` labels moved to another class."""
    y = splits(name)[1].numpy()
    n = len(y)
    rng = np.random.default_rng([seed, round(noise * 1000), zlib.crc32(name.encode())])
    chosen = rng.permutation(n)[:round(noise * n)]
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + rng.integers(1, CLASSES, size=len(chosen))) % CLASSES
    flipped = np.zeros(n, bool)
    flipped[chosen] = True
    return noisy, flipped


def noisy_train(name: str, noise: float, seed: int) -> TensorDataset:
    """The training split with ``noise`` of its labels flipped (``flips``): the job's dataset."""
    x = splits(name)[0]
    if noise == 0:
        return TensorDataset(x, splits(name)[1])
    return TensorDataset(x, torch.from_numpy(flips(name, noise, seed)[0]))


def fold_train(name: str, noise: float, seed: int, rows: tuple[int, ...]) -> Subset:
    """``noisy_train`` without one cross-validation fold: ``rows`` are the samples kept."""
    return Subset(noisy_train(name, noise, seed), list(rows))


def mlp(name: str) -> nn.Module:
    x = splits(name)[0]
    widths = (x.shape[1], *RECIPES[name].hidden)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], CLASSES))


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def signals(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the recorder keeps besides the loss: true-class probability (Data Maps), the probability
    margin, and the logit margin (AUM: assigned logit minus the largest other logit)."""
    logits = outputs.detach().float()
    targets = targets.long().reshape(-1, 1)
    probs = torch.softmax(logits, dim=1)
    true_prob = probs.gather(1, targets).squeeze(1)
    assigned = logits.gather(1, targets).squeeze(1)
    return {"true_prob": true_prob,
            "margin": true_prob - probs.scatter(1, targets, float("-inf")).max(dim=1).values,
            "logit_margin": assigned - logits.scatter(1, targets, float("-inf")).max(dim=1).values}


def job(name: str, dataset: Callable, plugins: list, seed: int, vnode_batch_size: int = VNODE_BATCH) -> JobSpec:
    return JobSpec(model=functools.partial(mlp, name), dataset=dataset,
                   optimizer=functools.partial(torch.optim.Adam, lr=LR), loss=per_sample_loss,
                   virtual_nodes=VNODES, vnode_batch_size=vnode_batch_size, seed=seed, deterministic=False,
                   device="cpu", num_threads=1, plugins=plugins)


def steps_per_epoch(num_samples: int, vnode_batch_size: int = VNODE_BATCH) -> int:
    return VNodeSampler(num_samples, VNODES, vnode_batch_size, 0).steps_per_epoch


# -- running and scoring a job ----------------------------------------------------------------------

class StepClock(Callback):
    """When the driver saw each step end, from ``t0`` (taken just before ``train()``)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.at: dict[int, float] = {}  # steps applied -> seconds since t0

    def on_step_end(self, state: RunState) -> None:
        self.at[state.step] = time.perf_counter() - self.t0


@dataclasses.dataclass
class Run:
    run_dir: Path
    steps: int
    wall_s: float
    clock: StepClock


class ProxyClock(logging.Handler):
    """The consistency proxy's time, from the line ``MetadataArchaeology.on_attach`` logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("metadata archaeology:") and len(record.args) == 3:
            self.seconds.append(float(record.args[2]))


PROXY = ProxyClock()


def run_job(spec: JobSpec, steps: int, run_dir: Path, checkpoint_every: Optional[int] = None,
            keep_checkpoints: int = 2) -> Run:
    t0 = time.perf_counter()
    clock = StepClock(t0)
    train(spec, steps=steps, checkpoint_dir=run_dir, checkpoint_every=checkpoint_every,
          keep_checkpoints=keep_checkpoints, callbacks=[clock], progress=False)
    return Run(run_dir, steps, time.perf_counter() - t0, clock)


def model_at(name: str, state: dict) -> nn.Module:
    model = mlp(name)
    model.load_state_dict(state)
    return model.eval()


def predict_proba(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).double().numpy()


def test_accuracy(name: str, state: dict) -> float:
    _, _, x, y = splits(name)
    return float((predict_proba(model_at(name, state), x).argmax(axis=1) == y.numpy()).mean())


def final_accuracy(name: str, run_dir: Path) -> float:
    return test_accuracy(name, latest_checkpoint(run_dir).model)


def accuracy_curve(name: str, run_dir: Path) -> list[tuple[int, float]]:
    """``(steps applied, test accuracy)`` of every checkpoint in ``run_dir``, oldest first."""
    curve = []
    for step, path in list_checkpoints(run_dir):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        curve.append((step, test_accuracy(name, state)))
    return curve


def precision_at_k(score: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Expected precision of the ``k`` highest scores when ties at the cut are broken at random."""
    order = np.sort(score)[::-1]
    cut = order[k - 1]
    above = score > cut
    tied = score == cut
    hits = positive[above].sum() + (k - above.sum()) * positive[tied].mean()
    return float(hits / k)


# -- (a) detection ----------------------------------------------------------------------------------

MAPD_SUM = "MAP-D, p(mislabeled) + p(atypical)"  # a diagnostic: not counted as a baseline or a target
METHODS = ("MAP-D, Euclidean", "MAP-D, DTW", MAPD_SUM, "final-epoch loss", "mean loss", "AUM", "Data Maps confidence",
           "cleanlab")
COSTS = {"MAP-D, Euclidean": "1 run + proxy", "MAP-D, DTW": "1 run + proxy", MAPD_SUM: "1 run + proxy",
         "final-epoch loss": "1 run",
         "mean loss": "1 run", "AUM": "1 run", "Data Maps confidence": "1 run", "cleanlab": f"{FOLDS} runs"}


@dataclasses.dataclass
class Detection:
    auroc: dict[str, float]
    precision: dict[str, float]
    flagged: int  # cleanlab's flagged non-probes
    k: int  # flipped non-probes
    atypical_flipped: float  # fraction of the atypical probes whose label the noise flipped
    proxy_s: float
    run_s: float  # the MAP-D run
    folds_s: float  # cleanlab's runs, together


def detection(name: str, noise: float, seed: int, work: Path, epochs: int, progress) -> Detection:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    noisy, flipped = flips(name, noise, seed)
    n = len(noisy)
    data = functools.partial(noisy_train, name, noise, seed)
    run_dir = work / f"detect-{name}-{noise}-{seed}"
    proxies = len(PROXY.seconds)
    run = run_job(job(name, data, [DynamicsRecorder(signals=signals), MetadataArchaeology()], seed),
                  epochs * steps_per_epoch(n), run_dir)
    proxy_s = sum(PROXY.seconds[proxies:])
    scores = {}
    for metric, method in (("euclidean", "MAP-D, Euclidean"), ("dtw", "MAP-D, DTW")):
        report = analyze(run_dir, metric=metric, write=False)
        scores[method] = report.p["mislabeled"].astype(np.float64)
        if metric == "euclidean":
            scores[MAPD_SUM] = scores[method] + report.p["atypical"]
    probes = np.unique(np.concatenate(list(report.probes.values())))
    kept = np.ones(n, bool)
    kept[probes] = False
    evaluated = load_dynamics(run_dir, "eval")
    seen = load_dynamics(run_dir, "train")
    scores["final-epoch loss"] = evaluated.loss[:, -1].astype(np.float64)
    scores["mean loss"] = evaluated.loss.mean(axis=1, dtype=np.float64)
    # A sample the sampler left out of every epoch would have no training-pass margin: none does
    # at these budgets (each epoch drops under 3% of the samples, independently).
    scores["AUM"] = -np.nanmean(seen.signals["logit_margin"].astype(np.float64), axis=1)
    scores["Data Maps confidence"] = -evaluated.true_prob.mean(axis=1, dtype=np.float64)

    # cleanlab: out-of-fold probabilities, each fold predicted by a model trained on the others
    t0 = time.perf_counter()
    pred = np.zeros((n, CLASSES))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(n), noisy)
    for fold, (rest, held) in enumerate(folds):
        fold_data = functools.partial(fold_train, name, noise, seed, tuple(rest.tolist()))
        fold_dir = work / f"fold-{name}-{noise}-{seed}-{fold}"
        run_job(job(name, fold_data, [], seed), epochs * steps_per_epoch(len(rest)), fold_dir)
        pred[held] = predict_proba(model_at(name, latest_checkpoint(fold_dir).model), splits(name)[0][held])
        shutil.rmtree(fold_dir, ignore_errors=True)
    folds_s = time.perf_counter() - t0
    scores["cleanlab"] = -get_label_quality_scores(noisy, pred)
    issues = find_label_issues(noisy, pred, return_indices_ranked_by="self_confidence", n_jobs=1)

    positive = flipped[kept]
    k = int(positive.sum())
    auroc = {m: float(roc_auc_score(positive, s[kept])) for m, s in scores.items()}
    precision = {m: precision_at_k(s[kept], positive, k) for m, s in scores.items() if m != "cleanlab"}
    flagged = issues[kept[issues]]
    top = flagged[:k]
    precision["cleanlab"] = float(flipped[top].mean()) if len(top) else 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    progress(f"  (a) {name} {noise:.0%} noise seed {seed}: MAP-D run {run.wall_s:.1f} s (proxy {proxy_s:.1f} s), "
             f"{FOLDS} cleanlab runs {folds_s:.1f} s; AUROC MAP-D {auroc['MAP-D, Euclidean']:.3f}, "
             f"AUM {auroc['AUM']:.3f}, cleanlab {auroc['cleanlab']:.3f}")
    atypical_flipped = float(flipped[report.probes["atypical"]].mean())
    return Detection(auroc, precision, len(flagged), k, atypical_flipped, proxy_s, run.wall_s, folds_s)


# -- (b) label correction ---------------------------------------------------------------------------

@dataclasses.dataclass
class Correction:
    plain: float
    corrected: float
    plain_s: float
    corrected_s: float


def correction(name: str, seed: int, work: Path, epochs: int, progress) -> Correction:
    data = functools.partial(noisy_train, name, CORRECT_NOISE, seed)
    steps = epochs * steps_per_epoch(len(splits(name)[1]))
    accuracy, seconds = {}, {}
    for label, plugins in (("plain", []),
                           ("corrected", [DynamicsRecorder(), MetadataArchaeology(),
                                                          LabelCorrection(warmup_epochs=max(2, epochs // 5))])):
        run_dir = work / f"correct-{name}-{seed}-{label}"
        run = run_job(job(name, data, plugins, seed), steps, run_dir)
        accuracy[label], seconds[label] = final_accuracy(name, run_dir), run.wall_s
        shutil.rmtree(run_dir, ignore_errors=True)
    progress(f"  (b) {name} seed {seed}: test accuracy plain {accuracy['plain']:.3f} ({seconds['plain']:.1f} s), "
             f"corrected {accuracy['corrected']:.3f} ({seconds['corrected']:.1f} s)")
    return Correction(accuracy["plain"], accuracy["corrected"], seconds["plain"], seconds["corrected"])


# -- (c) prioritized sampling -----------------------------------------------------------------------

SELECTORS = ("plain", "mapd", "loss")


def selection_plugins(selector: str) -> list:
    if selector == "plain":
        return []
    if selector == "mapd":
        return [DynamicsRecorder(), MetadataArchaeology(), PrioritizedSampling(keep=KEEP, score="mapd")]
    return [DynamicsRecorder(eval_pass=False), PrioritizedSampling(keep=KEEP, score="loss")]


@dataclasses.dataclass
class Reach:
    """One run of (c) on clean labels."""

    target: float  # plain's final test accuracy (this seed)
    final: float  # this run's
    backward: Optional[int]  # samples backpropagated until the first checkpoint at or above target; None: never
    seconds: Optional[float]  # wall clock from the train() call to that checkpoint's step
    budget: int  # samples backpropagated in the whole run


@dataclasses.dataclass
class Noisy:
    """One run of (c) at ``SELECT_NOISE``."""

    flipped_all: float  # fraction of backpropagated (non-probe) samples that were flipped, every epoch
    flipped_late: float  # the same over the second half of the epochs
    base: float  # fraction of flipped non-probe samples
    final: float


def prioritized(name: str, seed: int, work: Path, epochs: int, progress) -> tuple[dict[str, Reach], dict[str, Noisy]]:
    n = len(splits(name)[1])
    spe = steps_per_epoch(n)
    steps = epochs * spe
    backward_per_step = VNODES * VNODE_BATCH
    reach: dict[str, Reach] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    runs: dict[str, Run] = {}
    for selector in SELECTORS:
        batch = VNODE_BATCH if selector == "plain" else round(VNODE_BATCH / KEEP)
        run_dir = work / f"select-{name}-{seed}-{selector}"
        spec = job(name, functools.partial(noisy_train, name, 0.0, seed), selection_plugins(selector), seed, batch)
        runs[selector] = run_job(spec, steps, run_dir, checkpoint_every=spe, keep_checkpoints=epochs + 2)
        curves[selector] = accuracy_curve(name, run_dir)
        if selector != "plain":
            state = latest_checkpoint(run_dir).plugins["plugins"]["prioritized"]
            if state["backward_samples"] != steps * backward_per_step:
                raise RuntimeError(f"{selector}: {state['backward_samples']} samples backpropagated, expected "
                                   f"{steps * backward_per_step}")
        shutil.rmtree(run_dir, ignore_errors=True)
    target = curves["plain"][-1][1]
    for selector in SELECTORS:
        hit = next((step for step, acc in curves[selector] if acc >= target), None)
        reach[selector] = Reach(target, curves[selector][-1][1], None if hit is None else hit * backward_per_step,
                                None if hit is None else runs[selector].clock.at[hit], steps * backward_per_step)

    noisy: dict[str, Noisy] = {}
    _, flipped = flips(name, SELECT_NOISE, seed)
    kept = None
    for selector in ("mapd", "loss"):  # mapd first: its probes are left out of both counts
        run_dir = work / f"select-{name}-{seed}-{selector}-noisy"
        spec = job(name, functools.partial(noisy_train, name, SELECT_NOISE, seed), selection_plugins(selector), seed,
                   round(VNODE_BATCH / KEEP))
        run_job(spec, steps, run_dir)
        if kept is None:
            kept = np.ones(n, bool)
            kept[np.concatenate(list(analyze(run_dir, write=False).probes.values()))] = False
        chosen = np.isfinite(load_dynamics(run_dir, "train").loss) & kept[:, None]  # [samples, epochs]
        hits = chosen & flipped[:, None]
        late = chosen.shape[1] // 2
        noisy[selector] = Noisy(float(hits.sum() / chosen.sum()), float(hits[:, late:].sum() / chosen[:, late:].sum()),
                                float(flipped[kept].mean()), final_accuracy(name, run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)

    def at(selector: str) -> str:
        r = reach[selector]
        return "never" if r.backward is None else f"{r.backward:,} samples, {r.seconds:.1f} s"

    progress(f"  (c) {name} seed {seed}: plain final {target:.3f} reached at {at('plain')}; mapd {at('mapd')} "
             f"(final {reach['mapd'].final:.3f}); loss {at('loss')} (final {reach['loss'].final:.3f}); "
             f"at {SELECT_NOISE:.0%} noise, flipped among backpropagated: mapd {noisy['mapd'].flipped_all:.3f}, "
             f"loss {noisy['loss'].flipped_all:.3f}")
    return reach, noisy


# -- the report -------------------------------------------------------------------------------------


def _pm(values: list[float], fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(statistics.stdev(values) * scale)}"


def _verdict(passed: bool) -> str:
    return "[green]ok[/green]" if passed else "[red]missed[/red]"


def detection_table(console, results: dict[tuple[str, float], list[Detection]], epochs: dict[str, int]) -> None:
    from rich.table import Table

    table = Table(title="(a) Mislabeled detection over non-probe samples: AUROC and precision at K = flipped "
                  "samples; mean ± std over seeds; verdict: this MAP-D variant >= the best baseline's mean")
    for column, justify in (("dataset, noise", "left"), ("method", "left"), ("cost", "left"), ("AUROC", "right"),
                            ("", "center"), ("precision@K", "right"), ("", "center"), ("note", "left")):
        table.add_column(column, justify=justify)
    for (name, noise), runs in results.items():
        auroc = {m: [r.auroc[m] for r in runs] for m in METHODS}
        precision = {m: [r.precision[m] for r in runs] for m in METHODS}
        baselines = [m for m in METHODS if not m.startswith("MAP-D")]
        best_auroc = max(baselines, key=lambda m: statistics.fmean(auroc[m]))
        best_precision = max(baselines, key=lambda m: statistics.fmean(precision[m]))
        for i, method in enumerate(METHODS):
            verdict_a = verdict_p = note = ""
            if method == MAPD_SUM:
                note = (f"diagnostic: atypical probes flipped by the noise "
                        f"{_pm([r.atypical_flipped for r in runs], '{:.0f}', 100)}%")
            elif method.startswith("MAP-D"):
                verdict_a = _verdict(statistics.fmean(auroc[method]) >= statistics.fmean(auroc[best_auroc]))
                verdict_p = _verdict(statistics.fmean(precision[method]) >= statistics.fmean(precision[best_precision]))
                note = f"best baseline: {best_auroc} / {best_precision}"
                if method == "MAP-D, Euclidean":
                    note += (f"; proxy {_pm([r.proxy_s for r in runs], '{:.1f}')} s, "
                             f"run {_pm([r.run_s for r in runs], '{:.1f}')} s")
            elif method == "cleanlab":
                note = (f"flagged {_pm([r.flagged for r in runs], '{:.0f}')} vs "
                        f"K = {_pm([r.k for r in runs], '{:.0f}')}"
                        f"; P@K over min(K, flagged); runs {_pm([r.folds_s for r in runs], '{:.1f}')} s")
            label = f"{name} ({epochs[name]} epochs), {noise:.0%}" if i == 0 else ""
            table.add_row(label, method, COSTS[method], _pm(auroc[method]), verdict_a, _pm(precision[method]),
                          verdict_p, note, end_section=i == len(METHODS) - 1)
    console.print(table)


def correction_table(console, results: dict[str, list[Correction]], epochs: dict[str, int]) -> None:
    from rich.table import Table

    table = Table(title=f"(b) Label correction at {CORRECT_NOISE:.0%} noise: clean test accuracy (%) at the end of "
                  "training; plain cross-entropy vs recorder + archaeology + LabelCorrection(), same budget")
    for column, justify in (("dataset", "left"), ("plain", "right"), ("corrected", "right"),
                            ("difference", "right"), ("per seed", "right"), ("target", "right"), ("", "center"),
                            ("run time\nplain / corrected", "right")):
        table.add_column(column, justify=justify)
    for name, runs in results.items():
        diffs = [100 * (r.corrected - r.plain) for r in runs]
        table.add_row(f"{name} ({epochs[name]} epochs)", _pm([r.plain for r in runs], "{:.1f}", 100),
                      _pm([r.corrected for r in runs], "{:.1f}", 100), _pm(diffs, "{:+.1f}"),
                      ", ".join(f"{d:+.1f}" for d in diffs), f">= +{TARGET_CORRECTION_POINTS:.0f}",
                      _verdict(statistics.fmean(diffs) >= TARGET_CORRECTION_POINTS),
                      f"{_pm([r.plain_s for r in runs], '{:.1f}')} / {_pm([r.corrected_s for r in runs], '{:.1f}')} s")
    console.print(table)


def selection_tables(console, results: dict[str, list[tuple[dict[str, Reach], dict[str, Noisy]]]],
                     epochs: dict[str, int]) -> None:
    from rich.table import Table

    table = Table(title=f"(c) Prioritized sampling on clean labels: to reach plain's final test accuracy (per seed), "
                  f"samples backpropagated and wall clock; keep={KEEP} of {VNODES} x {round(VNODE_BATCH / KEEP)} "
                  f"candidates (plain: {VNODES} x {VNODE_BATCH}), {VNODES * VNODE_BATCH} backpropagated per step, "
                  "as many steps as plain; test accuracy checked once per plain epoch")
    for column, justify in (("dataset", "left"), ("method", "left"), ("reached", "right"),
                            ("samples backpropagated\nto reach", "right"), ("fewer than plain", "right"),
                            ("target", "right"), ("", "center"), ("wall clock\nto reach", "right"),
                            ("final test acc (%)", "right"), ("run budget\nbackpropagated", "right")):
        table.add_column(column, justify=justify)
    for name, seeds in results.items():
        for i, selector in enumerate(SELECTORS):
            rows = [reach[selector] for reach, _ in seeds]
            plains = [reach["plain"] for reach, _ in seeds]
            reached = [r for r in rows if r.backward is not None]
            # per seed: plain's samples to its own final accuracy over this method's; a seed where
            # the method never gets there counts as a miss
            ratios = [p.backward / r.backward for p, r in zip(plains, rows) if r.backward is not None]
            target = verdict = ""
            if selector != "plain":
                target = f">= {TARGET_BACKWARD_RATIO:.0f}x"
                verdict = _verdict(len(reached) == len(rows) and statistics.fmean(ratios) >= TARGET_BACKWARD_RATIO)
            method = {"plain": "plain (no plugins)", "mapd": 'PrioritizedSampling(score="mapd")',
                      "loss": 'PrioritizedSampling(score="loss")'}[selector]
            table.add_row(f"{name} ({epochs[name]} epochs)" if i == 0 else "", method, f"{len(reached)}/{len(rows)}",
                          _pm([r.backward for r in reached], "{:,.0f}"),
                          "-" if selector == "plain" else (_pm(ratios, "{:.2f}") + "x" if ratios else "-"),
                          target, verdict, _pm([r.seconds for r in reached], "{:.1f}") + " s" if reached else "-",
                          _pm([r.final for r in rows], "{:.1f}", 100), f"{rows[0].budget:,}",
                          end_section=i == len(SELECTORS) - 1)
    console.print(table)

    table = Table(title=f"(c) at {SELECT_NOISE:.0%} noise: fraction of backpropagated samples that were flipped "
                  "(non-probe samples of the MAP-D run; lower is better)")
    for column, justify in (("dataset", "left"), ("method", "left"), ("flipped, all epochs", "right"),
                            ("flipped, second half", "right"), ("flipped in the data", "right"),
                            ("final test acc (%)", "right")):
        table.add_column(column, justify=justify)
    for name, seeds in results.items():
        for i, selector in enumerate(("mapd", "loss")):
            rows = [noisy[selector] for _, noisy in seeds]
            table.add_row(f"{name}" if i == 0 else "", f'PrioritizedSampling(score="{selector}")',
                          _pm([r.flipped_all for r in rows]), _pm([r.flipped_late for r in rows]),
                          _pm([r.base for r in rows]), _pm([r.final for r in rows], "{:.1f}", 100),
                          end_section=i == 1)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, digits, 6 epochs: under 2 minutes")
    parser.add_argument("--seeds", help="comma-separated (default 0,1,2; smoke 0)")
    parser.add_argument("--datasets", help=f"comma-separated from {sorted(RECIPES)} (default both; smoke digits)")
    parser.add_argument("--parts", default="a,b,c", help="comma-separated from a,b,c (default %(default)s)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: digits 30, MNIST-1D 40; smoke 6)")
    parser.add_argument("--dir", help="where runs are written (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)

    def progress(line: str) -> None:
        console.print(line, style="dim", highlight=False)

    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(",")]
    names = (args.datasets or ("digits" if args.smoke else "digits,mnist1d")).split(",")
    parts = args.parts.split(",")
    for bad, allowed, option in ((set(names) - set(RECIPES), sorted(RECIPES), "--datasets"),
                                 (set(parts) - set(PARTS), PARTS, "--parts")):
        if bad:
            parser.error(f"{option}: unknown {sorted(bad)}; use values from {list(allowed)}")
    epochs = {name: args.epochs or (6 if args.smoke else RECIPES[name].epochs) for name in names}
    torch.set_num_threads(1)
    archaeology_module.log.setLevel(logging.INFO)
    archaeology_module.log.addHandler(PROXY)

    t0 = time.perf_counter()
    detected: dict[tuple[str, float], list[Detection]] = {}
    corrected: dict[str, list[Correction]] = {}
    selected: dict[str, list] = {}
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vnodes-bench-archaeology-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            progress(f"{name}: {len(splits(name)[1]):,} training samples, {epochs[name]} epochs")
            for seed in seeds:
                if "a" in parts:
                    for noise in DETECT_NOISE:
                        detected.setdefault((name, noise), []).append(detection(name, noise, seed, work, epochs[name],
                                                                                progress))
                if "b" in parts:
                    corrected.setdefault(name, []).append(correction(name, seed, work, epochs[name], progress))
                if "c" in parts:
                    selected.setdefault(name, []).append(prioritized(name, seed, work, epochs[name], progress))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - t0
    progress(f"measured in {total_s:.0f} s")

    console.print(header("torch", "numpy", "sklearn", "cleanlab"), highlight=False)
    recipe = "; ".join(f"{n}: MLP {'-'.join(str(w) for w in (splits(n)[0].shape[1], *RECIPES[n].hidden, CLASSES))}, "
                       f"{epochs[n]} epochs" for n in names)
    console.print(f"Adam lr {LR}, {VNODES} virtual nodes x {VNODE_BATCH} per step, 1 worker in process, fast mode; "
                  f"{recipe}; seeds {seeds}", highlight=False)
    if detected:
        detection_table(console, detected, epochs)
    if corrected:
        correction_table(console, corrected, epochs)
    if selected:
        selection_tables(console, selected, epochs)
    command = " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    console.print(f"total {total_s / 60:.1f} min; command: python {command}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
