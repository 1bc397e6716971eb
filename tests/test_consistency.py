"""The C-score proxy: hard samples score low and clean ones high, bitwise determinism, unseen
classes, bad input refused before any fit, and ``typical_atypical``'s picks."""

import numpy as np
import pytest

pytest.importorskip("sklearn")
roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score

from vnodes.scheduler.plugins import consistency  # noqa: E402
from vnodes.scheduler.plugins.consistency import consistency_proxy, typical_atypical  # noqa: E402

CLASSES, DIM = 4, 8


def planted(seed=0, per_class=100, hard=10, central=10):
    """Gaussian classes, plus planted samples: ``hard`` per class mislabeled (a random other label)
    and ``hard`` per class labeled c but placed at another class's mean; ``central`` per class near
    their own mean. Returns features, labels, and the indices of the hard and the central ones."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (CLASSES, DIM))
    y0 = np.repeat(np.arange(CLASSES), per_class)
    x, y = means[y0] + rng.normal(0, 1, (len(y0), DIM)), y0.copy()
    hard_idx, central_idx = [], []
    for c in range(CLASSES):
        members = np.flatnonzero(y0 == c)
        flipped, inside, near = members[:hard], members[hard:2 * hard], members[2 * hard:2 * hard + central]
        y[flipped] = (c + rng.integers(1, CLASSES, hard)) % CLASSES  # x stays in c's cloud
        other = (c + rng.integers(1, CLASSES, hard)) % CLASSES
        x[inside] = means[other] + rng.normal(0, 0.3, (hard, DIM))  # label c, deep in another class
        x[near] = means[c] + rng.normal(0, 0.3, (central, DIM))
        hard_idx += [*flipped, *inside]
        central_idx += list(near)
    return x, y, np.array(hard_idx), np.array(central_idx)


def test_planted_hard_samples_score_low_and_central_ones_high():
    x, y, hard, central = planted()
    scores = consistency_proxy(x, y, seed=0)
    assert scores.dtype == np.float32 and scores.shape == (len(y),)
    assert scores.min() >= 0 and scores.max() <= 1
    truth = np.r_[np.zeros(len(hard)), np.ones(len(central))]
    auroc = roc_auc_score(truth, np.r_[scores[hard], scores[central]])
    assert auroc > 0.9, auroc
    # And as probes: the 40 most atypical are mostly planted hard ones, the 40 most typical none.
    typical, atypical = typical_atypical(scores, 40)
    assert len(np.intersect1d(atypical, hard)) >= 30
    assert len(np.intersect1d(typical, hard)) == 0


def test_bitwise_deterministic_and_the_seed_matters():
    x, y, _, _ = planted(seed=1)
    a = consistency_proxy(x, y, seed=3, rounds=2)
    b = consistency_proxy(x.copy(), y.copy(), seed=3, rounds=2)
    assert a.tobytes() == b.tobytes()
    c = consistency_proxy(x, y, seed=4, rounds=2)
    assert not np.array_equal(a, c)


def test_random_projection_above_max_dim_is_seeded():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(0, 1, (60, 50)) + 2 * np.eye(3, 50)[y]
    a = consistency_proxy(x, y, seed=0, rounds=1, max_dim=5)
    b = consistency_proxy(x, y, seed=0, rounds=1, max_dim=5)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, consistency_proxy(x, y, seed=0, rounds=1, max_dim=50))  # unprojected


def test_label_ids_are_mapped_through_classes_and_unseen_classes_score_zero():
    x, y, _, _ = planted(seed=5, per_class=30)
    base = consistency_proxy(x, y, seed=0, rounds=2)
    ids = np.array([3, 7, 42, 1000])  # increasing: the same splits, other column ids
    assert consistency_proxy(x, ids[y], seed=0, rounds=2).tobytes() == base.tobytes()
    # A class of one sample: the model that predicts it never saw that class.
    y_lonely = y.copy()
    y_lonely[0] = 9
    scores = consistency_proxy(x, y_lonely, seed=0, rounds=2)
    assert scores[0] == 0
    assert np.all(np.isfinite(scores))


def test_a_half_with_a_single_class_gets_no_model_but_a_constant():
    x = np.arange(8, dtype=float).reshape(4, 2)
    y = np.array([0, 0, 0, 1])  # dealt by label: one half is all 0s
    scores = consistency_proxy(x, y, seed=0, rounds=1)
    assert scores[3] == 0  # class 1 is in one half only
    assert np.all((scores >= 0) & (scores <= 1))


def test_progress_counts_every_fit():
    x, y, _, _ = planted(seed=6, per_class=30)
    calls = []
    consistency_proxy(x, y, seed=0, rounds=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


@pytest.mark.parametrize("change,named", [
    (dict(x=np.zeros((10, 3)), y=np.zeros(9, int)), "9"),  # length mismatch
    (dict(x=np.zeros(10), y=np.zeros(10, int)), "(10,)"),  # features not 2-D
    (dict(x=np.zeros((3, 2)), y=np.array([0, 1, 0])), "3 samples"),
    (dict(y=np.zeros(10, int)), "single class (0)"),
    (dict(y=np.linspace(0, 1, 10)), "float64"),  # labels must be integer ids
    (dict(rounds=0), "rounds=0"),
    (dict(max_dim=0), "max_dim=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(x=np.where(np.eye(10, 3) > 0, np.nan, 0.0)), "features[0, 0] = nan"),
    (dict(x=np.full((10, 3), np.inf)), "inf"),
])
def test_bad_input_is_refused_with_the_value_before_any_fit(monkeypatch, change, named):
    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before validating")

    monkeypatch.setattr(consistency, "_held_out", no_fit)
    args = dict(x=np.random.default_rng(0).normal(size=(10, 3)), y=np.arange(10) % 2, rounds=2, max_dim=256,
                seed=0)
    args.update(change)
    with pytest.raises(ValueError) as err:
        consistency_proxy(args["x"], args["y"], seed=args["seed"], rounds=args["rounds"], max_dim=args["max_dim"])
    assert named in str(err.value)


def test_typical_atypical_order_ties_and_exclusion():
    scores = np.array([0.5, 0.9, 0.1, 0.9, 0.1, 0.7, 0.3, 0.9])
    typical, atypical = typical_atypical(scores, 2)
    assert typical.tolist() == [1, 3]  # three tie at 0.9: the lowest indices first
    assert atypical.tolist() == [2, 4]
    assert typical.dtype == atypical.dtype == np.int64
    typical, atypical = typical_atypical(scores, 3, exclude=[1, 2])
    assert typical.tolist() == [3, 7, 5]  # decreasing score
    assert atypical.tolist() == [4, 6, 0]  # increasing score
    typical, atypical = typical_atypical(scores, 1, exclude=np.array([3, 1, 7, 4]))
    assert (typical.tolist(), atypical.tolist()) == ([5], [2])


def test_typical_atypical_suites_are_disjoint_when_everything_ties():
    typical, atypical = typical_atypical(np.zeros(6), 3)
    assert typical.tolist() == [0, 1, 2]
    assert atypical.tolist() == [3, 4, 5]


@pytest.mark.parametrize("scores,count,exclude,named", [
    (np.arange(5.0), 3, None, "5 of 5 samples remain"),  # 2 x 3 > 5
    (np.arange(8.0), 3, [0, 1, 2], "5 of 8 samples remain after excluding 3"),
    (np.arange(8.0), 0, None, "count=0"),
    (np.arange(8.0), 1, [8], "index 8"),
    (np.arange(8.0), 1, [-1], "index -1"),
    (np.array([0.1, np.nan, 0.3, 0.4]), 1, None, "index 1"),
    (np.zeros((2, 4)), 1, None, "(2, 4)"),
])
def test_typical_atypical_refuses_with_the_value(scores, count, exclude, named):
    with pytest.raises(ValueError) as err:
        typical_atypical(scores, count, exclude)
    assert named in str(err.value)
