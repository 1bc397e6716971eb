"""A cheap, pre-training proxy for C-scores, to pick MAP-D's typical and atypical probes.

The C-score of a sample ``x`` with label ``y`` (Jiang et al., "Characterizing Structural
Regularities of Labeled Data in Overparameterized Models", ICML 2021) is the expected accuracy on
``(x, y)`` of models trained on random subsets of the data that exclude ``x``, averaged over subset
sizes. A high score marks a sample that the rest of the data explains (typical); a low one, a
sample that only memorisation gets right (atypical, ambiguous or mislabeled). MAP-D (Siddiqui et
al., ICLR 2023) uses the highest and lowest as its "typical" and "atypical" probe suites.

Exact C-scores take thousands of training runs. ``consistency_proxy`` takes ``2 * rounds`` fits of
a linear model on the master, before training starts, from the dataset alone: each round splits
the samples into two random halves (stratified by label), fits standardisation + multinomial
logistic regression on each half and predicts the other, so every sample gets ``rounds`` held-out
probabilities of its label, which are averaged. This is a C-score with one subset ratio (0.5),
``rounds`` holdouts and a linear model in place of the network; the held-out *probability* rather
than the 0/1 hit orders samples the few held-out predictions would leave tied.

Cost: ``2 * rounds`` lbfgs fits of a linear model, each on half the data (after a random projection
to ``max_dim`` dimensions, if wider); on the CPU, 0.6 s for digits and 1.3 s for MNIST-1D below.

Agreement with a small exact reference, measured by ``benchmarks/consistency.py --compare`` (2 CPU
cores, 2026-12-03): C-scores of one-hidden-layer MLPs (64 units), subset ratios 0.1 to 0.9, every
sample held out at least 30 times per ratio. Each cell: Spearman's rho / fraction in common of the
top 10% / of the bottom 10% (chance: 0.10). "Split-half" is the reference against itself, each half
from half its models: the ceiling its own noise sets.

    dataset (N x D)            reference    split-half          proxy, rounds=4     proxy CPU
    digits (1,797 x 64)        550 MLPs     0.83 / 0.73 / 0.88  0.74 / 0.57 / 0.77  0.6 s
    MNIST-1D (4,000 x 40)      550 MLPs     0.98 / 0.85 / 0.80  0.77 / 0.71 / 0.41  1.3 s

Choices, from the same runs:

- ``rounds``: 1 -> 2 -> 4 -> 8 gives rho 0.732 / 0.737 / 0.740 / 0.740 (digits) and 0.741 / 0.756 /
  0.765 / 0.771 (MNIST-1D), the overlaps within 0.02 of each other: 4 is near the plateau at half
  the cost of 8.
- Weight decay on the mean loss (``WEIGHT_DECAY``, sklearn's ``C = 1 / (decay * n_train)``, so the
  strength does not drift with the dataset's size): 0.01 / 0.03 / 0.1 / 0.3 / 1 gives rho 0.737 /
  0.743 / 0.740 / 0.721 / 0.673 (digits) and 0.724 / 0.745 / 0.765 / 0.776 / 0.771 (MNIST-1D); 0.1
  is within 0.011 of the best on both (and within 0.002 on 600- and 1,000-sample subsets of each,
  in a one-off run), where a fixed ``C`` tuned on one size loses up to 0.02 on the other.
- Other models in its place (rounds=4, rho digits / MNIST-1D): 30-NN 0.759 / 0.671 (top overlap
  0.32 on digits), LDA 0.726 / 0.667, Gaussian naive Bayes 0.535 / 0.621, 512 random Fourier
  features + logistic 0.752 / 0.768 at 8-9x the CPU time. Only the logistic regression is good on
  both datasets and at both tails. Its weak spot: the bottom 10% of MNIST-1D (0.41), samples a
  network separates and a linear model cannot.

    scores = consistency_proxy(x.reshape(len(x), -1), y, seed=0)
    typical, atypical = typical_atypical(scores, 250, exclude=other_probes)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import numpy as np

WEIGHT_DECAY = 0.1  # L2 strength on the *mean* log-loss: sklearn's C = 1 / (WEIGHT_DECAY * n_train)
MAX_ITER = 100  # lbfgs iterations per fit; at this strength it converges in 20-30 on both benchmark sets


def consistency_proxy(features: np.ndarray, labels: np.ndarray, *, seed: int, rounds: int = 4,
                      max_dim: int = 256, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Per-sample consistency proxy: the held-out probability of the given label, averaged over the
    ``rounds`` models (of ``2 * rounds``) that did not train on the sample.

    Args:
        features: ``[N, D]`` floats (flattened inputs). Above ``max_dim`` dimensions they are
            reduced to ``max_dim`` by a Gaussian random projection seeded from ``seed``.
        labels: ``[N]`` integer class ids.
        seed: seeds the splits (each round draws from ``numpy.random.default_rng([seed, round])``)
            and the projection. Same inputs and seed: bitwise the same scores.
        rounds: random half/half splits; each sample is held out once per round.
        max_dim: the most feature dimensions a model is fitted on.
        progress: called as ``progress(fits_done, 2 * rounds)`` after each fit.

    Returns:
        float32 ``[N]`` in [0, 1]. A sample whose class is absent from the other half (a class of
        one sample, say) gets probability 0 from that half's model.

    Raises:
        ValueError: unusable input (shapes, too few samples or classes, non-finite features,
            ``rounds`` or ``max_dim`` < 1), before anything is fitted.
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    return held_out_probabilities(features, labels, seed=seed, rounds=rounds, max_dim=max_dim, progress=progress)[0]


def held_out_probabilities(features: np.ndarray, labels: np.ndarray, *, seed: int, rounds: int = 4,
                           max_dim: int = 256, progress: Optional[Callable[[int, int], None]] = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``consistency_proxy`` and, beside it, each sample's held-out probability of the most likely
    *other* class (same models, same average). Where the second exceeds the first, the held-out
    models vote for another class: the sample is more likely mislabeled than atypical.

    Returns:
        ``(p_label, p_other)``, float32 ``[N]`` each. Raises as ``consistency_proxy``.
    """
    features, labels = _validate(features, labels, seed=seed, rounds=rounds, max_dim=max_dim)
    try:
        import sklearn  # noqa: F401  (an optional dependency: the 'archaeology' extra)
    except ImportError as exc:
        raise ImportError("consistency_proxy fits scikit-learn models: pip install scikit-learn") from exc
    features = _project(features, max_dim, seed)
    return _held_out(features, labels, seed, rounds, default_model, progress)


def default_model(n_train: int) -> Any:
    """The model fitted on each half of ``n_train`` samples: standardisation, then multinomial
    logistic regression with weight decay ``WEIGHT_DECAY`` on the mean loss (sklearn's ``C`` scales
    the summed loss, so a fixed ``C`` would regularise a large dataset less than a small one)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (WEIGHT_DECAY * n_train), max_iter=MAX_ITER))


def typical_atypical(scores: np.ndarray, count: int, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` highest-scoring (typical) and ``count`` lowest-scoring (atypical) indices.

    Indices in ``exclude`` (e.g. samples already taken as other probes) are skipped. Typical come in
    decreasing score, atypical in increasing score; equal scores in increasing index. The two sets
    are disjoint: atypical are chosen among the samples not taken as typical.

    Raises:
        ValueError: ``scores`` is not 1-D or holds NaN, ``count`` < 1, an excluded index is out of
            range, or fewer than ``2 * count`` samples remain after the exclusion.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores has shape {scores.shape}; pass one score per sample, shape [N]")
    if np.isnan(scores).any():
        raise ValueError(f"scores holds {int(np.isnan(scores).sum())} NaN value(s), e.g. at index "
                         f"{int(np.flatnonzero(np.isnan(scores))[0])}; every sample needs a score")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count={count!r}: pass an integer >= 1 (probes per suite)")
    n = len(scores)
    keep = np.ones(n, bool)
    if exclude is not None:
        excluded = np.asarray(list(exclude) if not isinstance(exclude, np.ndarray) else exclude).reshape(-1)
        if excluded.size:
            if not np.issubdtype(excluded.dtype, np.integer):
                raise ValueError(f"exclude has dtype {excluded.dtype}; pass integer sample indices")
            bad = excluded[(excluded < 0) | (excluded >= n)]
            if bad.size:
                raise ValueError(f"exclude holds index {int(bad[0])}, outside [0, {n}); pass indices of the "
                                 f"{n} scored samples")
            keep[excluded] = False
    remaining = np.flatnonzero(keep)
    if len(remaining) < 2 * count:
        raise ValueError(f"count={count}: {len(remaining)} of {n} samples remain after excluding "
                         f"{n - len(remaining)}, fewer than the 2 x {count} needed for two disjoint suites; "
                         "lower count or exclude fewer samples")
    kept = scores[remaining]
    # lexsort: the last key is the primary one; ``remaining`` is increasing, so ties go by index.
    typical = remaining[np.lexsort((remaining, -kept))[:count]]
    rest = np.setdiff1d(remaining, typical, assume_unique=True)
    atypical = rest[np.lexsort((rest, scores[rest]))[:count]]
    return typical.astype(np.int64), atypical.astype(np.int64)


# -- internals ------------------------------------------------------------------------------------

def _validate(features: Any, labels: Any, *, seed: Any, rounds: Any, max_dim: Any) -> tuple[np.ndarray, np.ndarray]:
    """Raise ``ValueError`` (naming the value and the fix) on input no fit could use."""
    for name, value in (("rounds", rounds), ("max_dim", max_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}: pass an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: pass an integer >= 0")
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"features has shape {features.shape}; pass [N, D] (flatten each input: "
                         "x.reshape(len(x), -1))")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise ValueError(f"features has dtype {features.dtype}; pass real numbers")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels has shape {labels.shape} and dtype {labels.dtype}; pass integer class ids, "
                         "shape [N]")
    if len(labels) != len(features):
        raise ValueError(f"features has {len(features)} rows but labels has {len(labels)} entries; pass one "
                         "label per row")
    if len(labels) < 4:
        raise ValueError(f"{len(labels)} samples: pass at least 4 (two per half)")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"labels hold a single class ({int(classes[0])}); pass samples of at least 2 classes")
    features = features.astype(np.float64, copy=False)
    finite = np.isfinite(features)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(f"features[{row}, {col}] = {features[row, col]} ({int((~finite).sum())} non-finite "
                         "value(s)); impute or drop those samples first")
    return features, labels


def _project(features: np.ndarray, max_dim: int, seed: int) -> np.ndarray:
    if features.shape[1] <= max_dim:
        return features
    from sklearn.random_projection import GaussianRandomProjection

    # The projection's own stream: a function of ``seed`` only, apart from the rounds' streams.
    state = int(np.random.default_rng([seed, 0x70726F6A]).integers(2**31 - 1))
    return GaussianRandomProjection(n_components=max_dim, random_state=state).fit_transform(features)


def _halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random halves, stratified: a random order, grouped by label (stably), dealt alternately."""
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    return np.sort(order[0::2]), np.sort(order[1::2])


def _held_out(features: np.ndarray, labels: np.ndarray, seed: int, rounds: int,
              make_model: Callable[[int], Any], progress: Optional[Callable[[int, int], None]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ``rounds`` of each sample's held-out probability of its label, and of the most
    likely other class, under ``make_model(n_train)`` fitted on the other half."""
    from sklearn.exceptions import ConvergenceWarning

    total = np.zeros(len(labels), np.float64)
    other = np.zeros(len(labels), np.float64)
    done = 0
    for r in range(rounds):
        a, b = _halves(labels, np.random.default_rng([seed, r]))
        for train, test in ((a, b), (b, a)):
            seen = np.unique(labels[train])
            if len(seen) == 1:  # a half of one class (tiny or lopsided data): no model can be fitted
                total[test] += labels[test] == seen[0]
                other[test] += labels[test] != seen[0]
            else:
                model = make_model(len(train))
                with warnings.catch_warnings():
                    # The iteration cap is part of the recipe: an early stop is expected, not a fault.
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model.fit(features[train], labels[train])
                p_label, p_other = _label_probability(model, features[test], labels[test])
                total[test] += p_label
                other[test] += p_other
            done += 1
            if progress is not None:
                progress(done, 2 * rounds)
    return (total / rounds).astype(np.float32), (other / rounds).astype(np.float32)


def _label_probability(model: Any, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P(label | x)`` for each row (0 where the label is a class the model never saw), and the
    largest probability of any other class."""
    proba = model.predict_proba(features)
    classes = np.asarray(model.classes_)
    column = np.searchsorted(classes, labels)  # classes_ is sorted
    column = np.minimum(column, len(classes) - 1)
    seen = classes[column] == labels
    out = np.zeros(len(labels), np.float64)
    rows = np.flatnonzero(seen)
    out[rows] = proba[rows, column[rows]]
    others = proba.copy()
    others[rows, column[rows]] = -np.inf
    return out, others.max(axis=1)
