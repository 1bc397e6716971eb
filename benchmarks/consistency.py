"""How well the C-score proxy (``consistency_proxy``) agrees with a small exact reference.

    python benchmarks/consistency.py            # 2-3 minutes on 2 CPU cores (--compare: ~40 s more)
    python benchmarks/consistency.py --smoke    # tiny sizes, well under a minute: checks the script itself

Two datasets, nothing downloaded: scikit-learn's ``load_digits`` (1,797 samples, 64 features, 10
classes) and MNIST-1D's training split, generated in process (``mnist1d.data.make_dataset``: 4,000
samples, 40 features, 10 classes).

**Reference** (the C-score of Jiang et al., 2021, at small scale): for each subset ratio
r in {0.1, 0.3, 0.5, 0.7, 0.9}, one-hidden-layer MLPs (64 ReLU units, Adam, lr 1e-2, 1,000 steps of
64 samples: the held-out accuracy of scikit-learn's ``MLPClassifier((64,), max_iter=200)``, at a
fraction of the cost) are trained on subsets of ``r * N`` samples and predict the rest. Subsets come
in cycles: a random permutation cut into 10 windows of ``(1 - r) * N`` consecutive positions
(wrapping), each window held out by one model, so a cycle holds every sample out exactly
``10 * (1 - r)`` times; a ratio gets enough cycles for ``--holdouts`` (30) holdouts per sample. The
score is the held-out 0/1 accuracy per sample, per ratio, averaged over the ratios. The models of a
ratio train together as one batched network (``torch.bmm``) on the CPU. Its own noise: the same score
from the even cycles against the odd ones ("split-half", each half with half the models).

**Proxy**: ``consistency_proxy(x, y, seed=0, rounds=R)`` for R in {1, 2, 4, 8}: its wall and CPU
time, and its agreement with the reference: Spearman's rank correlation, and the fraction in common
between the proxy's top (bottom) 10% and the reference's, which is what choosing typical (atypical)
probes needs (chance: 0.10). The reference orders samples by C-score, ties broken by its models'
mean held-out probability of the label (many samples are right under every model).

``--compare`` adds rows for other models in the proxy's place (same splits, ``rounds=4``): the
evidence for the default's choice of model and regularisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

from vnodes.scheduler.plugins import consistency

from machine import header
from vnodes.scheduler.plugins.consistency import consistency_proxy, typical_atypical

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
ROUNDS = (1, 2, 4, 8)
CYCLE = 10  # windows per permutation: 10 * (1 - r) must be a whole number for every ratio
TAIL = 0.1  # the top and bottom fractions compared


@dataclasses.dataclass(frozen=True)
class MLPRecipe:
    """The reference's model and training: one hidden layer, Adam, a fixed number of steps."""

    hidden: int = 64
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-2


# -- the datasets ---------------------------------------------------------------------------------

def load(name: str, limit: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())  # generated in process: never the download path
        x, y = data["x"], data["y"]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.int64)
    if limit is not None and limit < len(y):
        keep = np.sort(np.random.default_rng(0).permutation(len(y))[:limit])
        x, y = x[keep], y[keep]
    return x, y


# -- the reference --------------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    score: np.ndarray  # C-score: held-out accuracy, averaged per ratio then over ratios
    soft: np.ndarray  # the same with the probability of the label: the tie-break
    halves: tuple[tuple[np.ndarray, np.ndarray], ...]  # (score, soft) from the even cycles, from the odd ones
    models: int
    holdouts: dict[float, int]  # ratio -> times each sample was held out
    wall_s: float
    cpu_s: float


def windows(n: int, ratio: float, holdouts: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Held-out masks ``[models, n]`` and each model's cycle: every sample held out exactly
    ``cycles * 10 * (1 - ratio)`` times, at least ``holdouts``."""
    per_cycle = round(CYCLE * (1 - ratio))
    if not math.isclose(per_cycle, CYCLE * (1 - ratio), abs_tol=1e-9) or per_cycle < 1:
        raise ValueError(f"ratio {ratio}: 10 x (1 - ratio) must be a whole number >= 1")
    cycles = max(2, math.ceil(holdouts / per_cycle))  # two at least: the split-half needs both parities
    bounds = [round(j * (1 - ratio) * n) for j in range(CYCLE + 1)]
    held = np.zeros((cycles * CYCLE, n), bool)
    for c in range(cycles):
        perm = rng.permutation(n)
        for j in range(CYCLE):
            held[c * CYCLE + j, perm[np.arange(bounds[j], bounds[j + 1]) % n]] = True
    return held, np.repeat(np.arange(cycles), CYCLE)


def train_mlps(x: torch.Tensor, y: torch.Tensor, train: np.ndarray, recipe: MLPRecipe,
               seed: int) -> list[torch.Tensor]:
    """``len(train)`` MLPs at once, model ``k`` on the samples where ``train[k]`` is set."""
    g = torch.Generator().manual_seed(seed)
    k, d, classes = len(train), x.shape[1], int(y.max()) + 1
    counts = torch.as_tensor(train.sum(1))
    index = torch.zeros(k, int(counts.max()), dtype=torch.long)  # padded; only [:counts[m]] is drawn
    for m, row in enumerate(train):
        members = np.flatnonzero(row)
        index[m, :len(members)] = torch.as_tensor(members)
    w1 = (torch.randn(k, d, recipe.hidden, generator=g) * math.sqrt(2 / d)).requires_grad_()
    b1 = torch.zeros(k, 1, recipe.hidden, requires_grad=True)
    w2 = (torch.randn(k, recipe.hidden, classes, generator=g) * math.sqrt(1 / recipe.hidden)).requires_grad_()
    b2 = torch.zeros(k, 1, classes, requires_grad=True)
    params = [w1, b1, w2, b2]
    opt = torch.optim.Adam(params, lr=recipe.lr)
    for _ in range(recipe.steps):
        pick = (torch.rand(k, recipe.batch, generator=g) * counts[:, None]).long()
        rows = torch.gather(index, 1, pick)
        hidden = torch.relu(torch.baddbmm(b1, x[rows], w1))
        logits = torch.baddbmm(b2, hidden, w2)
        # Summed over models: each model's gradient is that of its own mean loss.
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, classes), y[rows].reshape(-1)) * k
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


def predict(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            chunk: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Every model on every sample: 0/1 hits and the probability of the label, ``[models, n]``."""
    w1, b1, w2, b2 = params
    hits, probs = [], []
    with torch.no_grad():
        for s in range(0, len(w1), chunk):
            e = slice(s, s + chunk)
            hidden = torch.relu(torch.baddbmm(b1[e], x.expand(w1[e].shape[0], -1, -1), w1[e]))
            logits = torch.baddbmm(b2[e], hidden, w2[e])
            hits.append((logits.argmax(-1) == y).numpy())
            probs.append(torch.softmax(logits, -1).gather(2, y.expand(len(logits), -1)[..., None])[..., 0].numpy())
    return np.concatenate(hits), np.concatenate(probs)


def reference_cscore(features: np.ndarray, labels: np.ndarray, holdouts: int, recipe: MLPRecipe, seed: int,
                     progress: Callable[[str], None]) -> Reference:
    t0, c0 = time.perf_counter(), time.process_time()
    std = features.std(0)
    x = torch.as_tensor((features - features.mean(0)) / np.where(std > 0, std, 1.0), dtype=torch.float32)
    y = torch.as_tensor(labels)
    n = len(labels)
    score, soft = np.zeros(n), np.zeros(n)
    half_sums = [[np.zeros(n), np.zeros(n)], [np.zeros(n), np.zeros(n)]]  # parity -> [score, soft]
    models, counts = 0, {}
    for i, ratio in enumerate(RATIOS):
        held, cycle = windows(n, ratio, holdouts, np.random.default_rng([seed, i]))
        params = train_mlps(x, y, ~held, recipe, seed=seed * 1000 + i)
        hits, probs = predict(params, x, y)
        times = held.sum(0)
        counts[ratio] = int(times.min())
        if times.min() != times.max():
            raise RuntimeError(f"ratio {ratio}: holdouts per sample range {times.min()}-{times.max()}")
        score += (hits * held).sum(0) / times
        soft += (probs * held).sum(0) / times
        for parity in (0, 1):
            rows = held & (cycle % 2 == parity)[:, None]
            half_sums[parity][0] += (hits * rows).sum(0) / rows.sum(0)
            half_sums[parity][1] += (probs * rows).sum(0) / rows.sum(0)
        models += len(held)
        progress(f"  ratio {ratio}: {len(held)} models, held out {counts[ratio]}x each, "
                 f"held-out accuracy {(hits * held).sum() / held.sum():.3f}, "
                 f"{time.perf_counter() - t0:.0f} s so far")
    k = len(RATIOS)
    halves = tuple((h[0] / k, h[1] / k) for h in half_sums)
    return Reference(score / k, soft / k, halves, models, counts,
                     time.perf_counter() - t0, time.process_time() - c0)


# -- agreement ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Agreement:
    spearman: float
    top: float  # fraction of the proxy's top 10% in the reference's top 10%
    bottom: float


def tails(scores: np.ndarray, tiebreak: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """The top and bottom ``TAIL`` of the samples, as ``typical_atypical`` picks them."""
    count = max(1, round(TAIL * len(scores)))
    if tiebreak is None:
        return typical_atypical(scores, count)
    rank = np.empty(len(scores))
    rank[np.lexsort((tiebreak, scores))] = np.arange(len(scores))  # ties in C-score: by probability
    return typical_atypical(rank, count)


def agreement(scores: np.ndarray, ref_tails: tuple[np.ndarray, np.ndarray], reference: np.ndarray,
              tiebreak: Optional[np.ndarray] = None) -> Agreement:
    from scipy.stats import spearmanr

    top, bottom = tails(scores, tiebreak)
    count = len(top)
    return Agreement(float(spearmanr(scores, reference).statistic),
                     len(np.intersect1d(top, ref_tails[0])) / count,
                     len(np.intersect1d(bottom, ref_tails[1])) / count)


@dataclasses.dataclass
class Row:
    dataset: str
    what: str
    models: int
    wall_s: Optional[float]
    cpu_s: Optional[float]
    agree: Optional[Agreement]
    note: str = ""


def alternatives() -> dict[str, Callable[[int], object]]:
    """Other models in the proxy's place: weaker and stronger L2, and a few non-linear or generative ones."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.kernel_approximation import RBFSampler
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def logistic(decay: float, scaled: bool = True) -> Callable[[int], object]:
        def make(n: int) -> object:
            model = LogisticRegression(C=1.0 / (decay * n), max_iter=consistency.MAX_ITER)
            return make_pipeline(StandardScaler(), model) if scaled else model
        return make

    default = consistency.WEIGHT_DECAY
    return {
        **{f"logistic, weight decay {d:g}": logistic(d) for d in (0.01, 0.03, 0.3, 1.0)},
        f"logistic, weight decay {default:g}, not standardised": logistic(default, scaled=False),
        "30-NN, distance-weighted": lambda n: make_pipeline(StandardScaler(),
                                                            KNeighborsClassifier(30, weights="distance")),
        "LDA": lambda n: LinearDiscriminantAnalysis(),
        "Gaussian naive Bayes": lambda n: GaussianNB(),
        "512 random Fourier features + logistic C=0.1": lambda n: make_pipeline(
            StandardScaler(), RBFSampler(gamma=0.02, n_components=512, random_state=0),
            LogisticRegression(C=0.1, max_iter=consistency.MAX_ITER)),
    }


def measure(name: str, limit: Optional[int], holdouts: int, recipe: MLPRecipe, rounds: tuple[int, ...],
            compare: bool, progress: Callable[[str], None]) -> list[Row]:
    features, labels = load(name, limit)
    progress(f"{name}: {len(labels):,} samples x {features.shape[1]} features, reference...")
    ref = reference_cscore(features, labels, holdouts, recipe, seed=0, progress=progress)
    ref_tails = tails(ref.score, ref.soft)
    perfect = float((ref.score == 1).mean())
    held = ", ".join(f"{r}: {h}x" for r, h in ref.holdouts.items())
    rows = [Row(name, "reference C-score (MLP)", ref.models, ref.wall_s, ref.cpu_s, None,
                f"{len(labels):,} samples; held out per ratio {held}; {perfect:.0%} right under every model"),
            Row(name, "reference, split-half (even vs odd cycles)", ref.models // 2, None, None,
                agreement(ref.halves[0][0], tails(*ref.halves[1]), ref.halves[1][0], tiebreak=ref.halves[0][1]),
                "its own noise, each half with half the models")]
    for r in rounds:
        t0, c0 = time.perf_counter(), time.process_time()
        scores = consistency_proxy(features, labels, seed=0, rounds=r)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(Row(name, f"proxy, rounds={r}", 2 * r, wall, cpu, agreement(scores, ref_tails, ref.score)))
        progress(f"  proxy rounds={r}: {wall:.2f} s, Spearman {rows[-1].agree.spearman:.3f}")
    for what, make in (alternatives() if compare else {}).items():
        t0, c0 = time.perf_counter(), time.process_time()
        # The proxy's own loop (splits, probability of the label) with another model.
        scores = consistency._held_out(features, labels, 0, 4, make, None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(Row(name, f"instead: {what}, rounds=4", 8, wall, cpu, agreement(scores, ref_tails, ref.score)))
        progress(f"  {what}: {wall:.2f} s, Spearman {rows[-1].agree.spearman:.3f}")
    return rows


# -- the report -----------------------------------------------------------------------------------


def _s(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:,.2f} s"


def print_table(console, rows: list[Row], recipe: MLPRecipe, threads: int) -> None:
    from rich.table import Table

    console.print(header("torch", "numpy", "sklearn"), highlight=False)
    table = Table(title=f"C-score proxy against a small exact reference: MLP {recipe.hidden} hidden units, "
                  f"Adam lr {recipe.lr}, {recipe.steps} steps x {recipe.batch}, ratios {list(RATIOS)}; proxy: "
                  f"consistency_proxy(seed=0): 2 x rounds fits of logistic regression, weight decay "
                  f"{consistency.WEIGHT_DECAY:g}; top/bottom "
                  f"{TAIL:.0%} overlap, chance {TAIL:.2f}; torch {threads} thread(s)")
    for name, justify in (("dataset", "left"), ("scores", "left"), ("models\nfitted", "right"),
                          ("wall", "right"), ("CPU", "right"), ("Spearman\nvs reference", "right"),
                          (f"top {TAIL:.0%}\nin common", "right"), (f"bottom {TAIL:.0%}\nin common", "right"),
                          ("note", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        a = row.agree
        table.add_row(row.dataset, row.what, f"{row.models:,}", _s(row.wall_s), _s(row.cpu_s),
                      "-" if a is None else f"{a.spearman:.3f}", "-" if a is None else f"{a.top:.2f}",
                      "-" if a is None else f"{a.bottom:.2f}", row.note)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--holdouts", type=int, help="times each sample is held out per ratio, at least "
                        "(default 30; smoke 2)")
    parser.add_argument("--steps", type=int, help="training steps of each reference MLP (default 1000; smoke 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    parser.add_argument("--datasets", default="digits,mnist1d", help="comma-separated (default %(default)s)")
    parser.add_argument("--compare", action="store_true", help="add rows for other models in the proxy's place "
                        "(about 40 s more)")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)

    def progress(line: str) -> None:
        console.print(line, style="dim", highlight=False)

    if args.smoke:
        limit, holdouts, recipe, rounds = 400, args.holdouts or 2, MLPRecipe(steps=args.steps or 100), (1, 2)
    else:
        limit, holdouts, recipe, rounds = None, args.holdouts or 30, MLPRecipe(steps=args.steps or 1000), ROUNDS
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for name in args.datasets.split(","):
        rows += measure(name, limit, holdouts, recipe, rounds, args.compare, progress)
    progress(f"measured in {time.perf_counter() - t0:.0f} s")
    print_table(console, rows, recipe, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
