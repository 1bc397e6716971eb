"""``knn_proba`` (scheduler/plugins/knn.py): scikit-learn's vote, chunked; memory maps; DTW; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vnodes.scheduler.plugins.knn import knn_proba

KNeighborsClassifier = pytest.importorskip("sklearn.neighbors").KNeighborsClassifier


def walks(rng: np.random.Generator, n: int, epochs: int) -> np.ndarray:
    """Random-walk trajectories: continuous, so no two distances tie."""
    return rng.normal(size=(n, epochs)).cumsum(axis=1)


def lower_index_vote(dist: np.ndarray, labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """The reference vote from a full distance matrix [n, R]: the k smallest, ties to the lower index."""
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    counts = np.stack([np.bincount(labels[row], minlength=num_classes) for row in nearest])
    return (counts / k).astype(np.float32)


# -- against scikit-learn --------------------------------------------------------------------------

@pytest.mark.parametrize("refs, epochs, classes, k, queries, chunk_rows", [
    (50, 5, 3, 1, 97, 10),  # kd-tree in sklearn (few epochs); 1-NN
    (200, 30, 4, 20, 301, 64),  # brute force in sklearn; MAP-D's k; last chunk partial
    (40, 100, 5, 40, 33, None),  # k == R: every reference votes; one automatic chunk
    (120, 12, 6, 7, 250, 1),  # one row per chunk
    (300, 20, 4, 20, 200, 37),
])
def test_matches_sklearn_predict_proba(refs, epochs, classes, k, queries, chunk_rows):
    rng = np.random.default_rng(refs * 1000 + k)
    ref, q = walks(rng, refs, epochs), walks(rng, queries, epochs)
    labels = rng.integers(0, classes, refs)
    labels[:classes] = np.arange(classes)  # every class present, so sklearn's columns are ours
    expected = KNeighborsClassifier(n_neighbors=k).fit(ref, labels).predict_proba(q)
    got = knn_proba(ref, labels, q, num_classes=classes, k=k, chunk_rows=chunk_rows)
    assert got.dtype == np.float32 and got.shape == (queries, classes)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    if k < refs:  # some query has a class none of its neighbours has: the 0 entries are compared too
        assert (got == 0).any()


def test_float32_input_matches_sklearn():
    """The recorded tables are float32: both sides upcast them to float64."""
    rng = np.random.default_rng(7)
    ref, q = walks(rng, 400, 50).astype(np.float32), walks(rng, 500, 50).astype(np.float32)
    labels = rng.integers(0, 4, 400)
    expected = KNeighborsClassifier(n_neighbors=20).fit(ref, labels).predict_proba(q)
    np.testing.assert_array_equal(knn_proba(ref, labels, q, chunk_rows=128), expected.astype(np.float32))


def test_ties_go_to_the_lower_reference_index_as_sklearn_does_when_closer_references_come_first():
    # Query 0 is at distance 1 from references 1..4 (labels 1..4): a tie at the k-th neighbour for k >= 2.
    ref = np.array([[0.0], [1.0], [-1.0], [1.0], [-1.0]])
    labels = np.arange(5)
    q = np.array([[0.0], [0.1], [-0.1]])
    for k in (1, 2, 3, 4):
        expected = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(ref, labels).predict_proba(q)
        for chunk_rows in (1, 2, None):
            np.testing.assert_array_equal(knn_proba(ref, labels, q, k=k, chunk_rows=chunk_rows),
                                          expected.astype(np.float32))
    np.testing.assert_array_equal(knn_proba(ref, labels, q[:1], k=2), [[0.5, 0.5, 0, 0, 0]])


def test_heavy_ties_follow_the_lower_index_rule_whatever_the_chunking():
    """Integer-valued trajectories: most k-th distances tie (sklearn's pick then depends on its heap)."""
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 3, (60, 3)).astype(np.float64)
    ref[40:50] = ref[0]  # exact duplicates of reference 0, with other labels
    labels = rng.integers(0, 4, 60)
    q = rng.integers(0, 3, (90, 3)).astype(np.float64)
    dist = ((q[:, None, :] - ref[None, :, :]) ** 2).sum(axis=2)
    tied = 0
    for k in (1, 5, 20, 59):
        kth = np.sort(dist, axis=1)[:, k - 1:k + 1]
        tied += int((kth[:, 0] == kth[:, 1]).sum())
        expected = lower_index_vote(dist, labels, k, 4)
        for chunk_rows in (1, 7, None):
            np.testing.assert_array_equal(knn_proba(ref, labels, q, num_classes=4, k=k, chunk_rows=chunk_rows),
                                          expected)
    assert tied > 100  # the rule was exercised


# -- chunks, memory maps, NaN ------------------------------------------------------------------------

def test_memmap_epoch_major_gives_the_in_memory_result(tmp_path):
    rng = np.random.default_rng(11)
    table = walks(rng, 1000, 16).astype(np.float32)  # [samples, epochs]
    path = tmp_path / "loss.f32"
    table.T.astype("<f4").tofile(path)  # epoch-major on disk, as the recorder writes it
    view = np.memmap(path, dtype="<f4", mode="r", shape=(16, 1000)).T  # as load_dynamics returns it
    idx = rng.choice(1000, 80, replace=False)
    ref, labels = np.ascontiguousarray(view[idx]), rng.integers(0, 4, 80)
    calls = []
    got = knn_proba(ref, labels, view, chunk_rows=300, progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(got, knn_proba(ref, labels, table, chunk_rows=1000))
    expected = KNeighborsClassifier(20).fit(ref, labels).predict_proba(table)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    assert calls == [(300, 1000), (600, 1000), (900, 1000), (1000, 1000)]
    np.testing.assert_array_equal(view, table)  # the map still reads right after its pages were released


def test_copy_on_write_memmap_keeps_the_callers_changes(tmp_path):
    """A ``mode="c"`` map's written pages exist only in this process: they must not be released."""
    rng = np.random.default_rng(12)
    table = walks(rng, 200, 8).astype(np.float32)
    path = tmp_path / "loss.f32"
    table.T.tofile(path)
    view = np.memmap(path, dtype="<f4", mode="c", shape=(8, 200)).T
    view[5] = 1e3  # a private change, far from everything
    table[5] = 1e3
    ref, labels = table[:30].copy(), np.arange(30) % 3
    got = knn_proba(ref, labels, view, k=1, chunk_rows=16)
    np.testing.assert_array_equal(got, knn_proba(ref, labels, table, k=1))
    assert float(view[5, 0]) == 1e3


def test_query_rows_with_nan_or_inf_are_nan_and_the_rest_unchanged():
    rng = np.random.default_rng(5)
    ref, q = walks(rng, 30, 6), walks(rng, 12, 6)
    labels = rng.integers(0, 3, 30)
    clean = knn_proba(ref, labels, q, k=5)
    q[2, 3], q[7, 0], q[8, 5] = np.nan, np.inf, -np.inf
    before = q.copy()
    got = knn_proba(ref, labels, q, k=5, chunk_rows=4)
    bad = np.zeros(12, bool)
    bad[[2, 7, 8]] = True
    assert np.isnan(got[bad]).all()
    np.testing.assert_array_equal(got[~bad], clean[~bad])
    np.testing.assert_array_equal(q, before)  # the caller's array is not written


def test_nan_references_are_refused_with_how_many():
    ref = np.ones((10, 4))
    ref[[1, 6], 2] = np.nan
    with pytest.raises(ValueError, match=r"2 of 10 reference rows hold NaN.*drop those rows"):
        knn_proba(ref, np.zeros(10, int), np.ones((3, 4)), k=1)


# -- DTW -----------------------------------------------------------------------------------------------

def test_dtw_vote_matches_brute_force_dtaidistance():
    dtw = pytest.importorskip("dtaidistance.dtw")
    rng = np.random.default_rng(9)
    ref, q = walks(rng, 30, 20), walks(rng, 12, 20)
    labels = rng.integers(0, 3, 30)
    for window in (None, 3):
        dist = np.array([[dtw.distance(a, b, window=window) for b in ref] for a in q])
        for k in (1, 7):
            got = knn_proba(ref, labels, q, num_classes=3, k=k, metric="dtw", dtw_window=window, chunk_rows=5)
            np.testing.assert_array_equal(got, lower_index_vote(dist, labels, k, 3))


def test_dtw_finds_the_shifted_copy_that_euclidean_misses():
    pytest.importorskip("dtaidistance")
    def bump(centre: float) -> np.ndarray:
        return np.exp(-0.5 * ((np.arange(60) - centre) / 3.0) ** 2)

    ref = np.stack([bump(20), np.zeros(60)])  # label 0: the bump; label 1: a flat line
    q = bump(32)[None]  # the same bump, 12 epochs later
    # Euclidean: the flat line is closer (one bump's energy) than the unshifted bump (two bumps' energy).
    np.testing.assert_array_equal(knn_proba(ref, np.array([0, 1]), q, k=1), [[0.0, 1.0]])
    np.testing.assert_array_equal(knn_proba(ref, np.array([0, 1]), q, k=1, metric="dtw"), [[1.0, 0.0]])
    # A window narrower than the shift cannot align them.
    np.testing.assert_array_equal(knn_proba(ref, np.array([0, 1]), q, k=1, metric="dtw", dtw_window=2),
                                  [[0.0, 1.0]])


# -- bad input -------------------------------------------------------------------------------------------

GOOD = dict(references=np.zeros((5, 3)), labels=np.array([0, 1, 2, 0, 1]), queries=np.zeros((4, 3)), k=2)


@pytest.mark.parametrize("change, error, message", [
    (dict(k=0), ValueError, r"k=0\): must be an integer >= 1"),
    (dict(k=2.5), ValueError, r"k=2.5\)"),
    (dict(k=True), ValueError, r"k=True\)"),
    (dict(k=6), ValueError, r"k=6\): only 5 references.*lower k to at most 5"),
    (dict(metric="cosine"), ValueError, r"metric='cosine'\): must be one of \('euclidean', 'dtw'\)"),
    (dict(references=np.zeros(5)), ValueError, r"references of shape \(5,\); need \[R, E\]"),
    (dict(references=np.zeros((0, 3))), ValueError, r"references of shape \(0, 3\)"),
    (dict(references=np.array([["a"] * 3] * 5)), TypeError, r"references of dtype <U1"),
    (dict(labels=np.array([0, 1, 2])), ValueError, r"labels of shape \(3,\) for 5 references"),
    (dict(labels=np.array([0.0, 1, 2, 0, 1])), TypeError, r"labels of dtype float64.*astype\(np.int64\)"),
    (dict(labels=np.array([0, 1, -1, 0, 1])), ValueError, r"label -1 < 0"),
    (dict(num_classes=2), ValueError, r"label 2 >= num_classes=2.*raise num_classes"),
    (dict(num_classes=0), ValueError, r"num_classes=0\): must be an integer >= 1"),
    (dict(queries=np.zeros((4, 2))), ValueError, r"queries of shape \(4, 2\) against references of 3 epochs"),
    (dict(queries=np.zeros(3)), ValueError, r"queries of shape \(3,\)"),
    (dict(queries=np.zeros((4, 3), complex)), TypeError, r"queries of dtype complex128"),
    (dict(chunk_rows=0), ValueError, r"chunk_rows=0\): must be an integer >= 1"),
    (dict(dtw_window=3), ValueError, r"dtw_window=3\) with metric='euclidean'.*metric='dtw' only"),
    (dict(metric="dtw", dtw_window=0), ValueError, r"dtw_window=0\): must be an integer >= 1"),
    (dict(progress="yes"), TypeError, r"progress='yes'\): must be a callable"),
    (dict(device="tpu"), ValueError, r"device='tpu'\): 'tpu' is not a device.*use cpu, cuda or cuda:K"),
    (dict(device="meta"), ValueError, r"device='meta'\): 'meta': .* must be cpu, cuda or cuda:K"),
    (dict(device="cuda", metric="dtw"), ValueError, r"device='cuda'\) with metric='dtw': DTW runs on the CPU only"),
])
def test_bad_input_names_the_value_and_the_fix(change, error, message):
    args = {**GOOD, **change}
    with pytest.raises(error, match=message):
        knn_proba(args.pop("references"), args.pop("labels"), args.pop("queries"), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused():
    with pytest.raises(ValueError, match=r"device='cuda'\): 'cuda': this machine has no usable CUDA device; use cpu"):
        knn_proba(GOOD["references"], GOOD["labels"], GOOD["queries"], k=2, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_vote_is_the_cpus_tie_for_tie():
    rng = np.random.default_rng(5)
    ref, q = rng.integers(0, 3, (300, 4)).astype(np.float64), rng.integers(0, 3, (500, 4)).astype(np.float64)
    labels = rng.integers(0, 4, 300)
    for k in (1, 20):
        for chunk_rows in (7, None):
            np.testing.assert_array_equal(knn_proba(ref, labels, q, k=k, chunk_rows=chunk_rows, device="cuda"),
                                          knn_proba(ref, labels, q, k=k, chunk_rows=chunk_rows))


def test_bad_input_is_refused_before_reading_any_query():
    class Untouchable(np.ndarray):
        def __getitem__(self, item):
            raise AssertionError("a query row was read")

    q = np.zeros((4, 3)).view(Untouchable)
    with pytest.raises(ValueError, match="k=9"):
        knn_proba(GOOD["references"], GOOD["labels"], q, k=9)
    assert knn_proba(GOOD["references"], GOOD["labels"], np.zeros((0, 3)), k=2).shape == (0, 3)
