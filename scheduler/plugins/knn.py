"""``knn_proba``: MAP-D's k-nearest-neighbour vote over loss trajectories, in bounded memory.

MAP-D (Siddiqui et al., "Metadata Archaeology: Unearthing Data Subsets by Leveraging Training
Dynamics", ICLR 2023) describes each training sample by its loss at every epoch, a vector of
length E, and classifies it by the suites (mislabeled, corrupted, typical, atypical...) of the
reference probes nearest to that vector: scikit-learn's ``KNeighborsClassifier(20)``, uniform
weights, Euclidean distance on the raw losses. A sample's p(suite) is the fraction of its k nearest
references in that suite. ``knn_proba`` computes that (equal to ``predict_proba`` wherever no two
references tie at the k-th distance), for tables far larger than memory:

- **Chunking.** The queries (a ``[N, E]`` array, typically the transposed epoch-major memory map
  that ``load_dynamics`` returns) are read ``chunk_rows`` rows at a time, never whole. For each
  chunk, every query-reference distance is computed at once (``[chunk_rows, R]``), the k nearest
  are kept (``topk``), and their labels are counted.
- **Memory bound.** By default ``chunk_rows = BLOCK_BYTES // (8 R)``, so the float64 distance
  block stays under ``BLOCK_BYTES`` (64 MiB) whatever N is. Besides it a chunk holds its rows
  (as read, and in float64: 12 bytes per value for float32 input) and ``topk``'s output; ties at the
  k-th distance are resolved a quarter-chunk at a time in 11 bytes per reference and row (at most
  0.35 x the block). So the transient memory is about 1.4 x ``BLOCK_BYTES`` plus the chunk's rows,
  on top of the references (R x E float64) and the result (N x num_classes float32): at 1.28M
  samples x 100 epochs and 1,000 or 2,000 references, the peak RSS grows by 130-150 MiB for a
  488 MiB table (``benchmarks/knn.py``). Reading through a memory map puts the pages read into this
  process's resident set (file-backed, but RSS and cgroup limits count them, and a fault can map a
  whole page-cache folio, up to 2 MiB), so a map is copied ``READ_EPOCHS`` epochs at a time and its
  pages are released in between (``madvise(MADV_DONTNEED)``: they leave this process and stay in the
  page cache; nothing is lost on a read-only or shared map). A copy-on-write map (``mode="c"``) is
  read whole-chunk and never released (that would drop the caller's private changes): its pages
  accumulate up to the table's size.
- **Euclidean**, in float64, as scikit-learn computes it (it upcasts float32 input to float64 too):
  the block is ``|r|^2 - 2 q.r`` (one ``addmm``), which orders the references as ``|q - r|^2`` does
  (``|q|^2`` is the same for every reference of a row), then ``topk``. Float32 would halve the block's
  memory and run 1.3-1.4x faster on CPU, but its rounding (about 1e-7 of ``|r|^2``, against 1e-16)
  reorders close neighbours: on 50,000 random-walk trajectories against 1,000 references it changed
  the vote of 7 samples (``benchmarks/knn.py`` measures both). On CPU, scikit-learn's own search
  (a GEMM, then a bounded heap in Cython) is 1.5-2x faster than this one; what this one adds is
  the memory bound on a table of any size, NaN rows, and progress.
- **Ties** at the k-th distance go to the lower reference index, whatever the chunking. Scikit-learn
  keeps a bounded max-heap fed in index order: a reference that only equals the current k-th
  distance is refused, so it too keeps the lower index when the tied references come after the
  closer ones; but when a closer reference arrives later, its heap drops whichever tied reference
  sits at its root, and its rounding can split distances that are equal here. On exact ties the two
  may therefore differ; without ties (continuous data) they agree exactly.
- **DTW** (``metric="dtw"``): dynamic time warping through ``dtaidistance``'s C implementation
  (``dtw.distance_matrix_fast``, one block of references x chunk per call; ``dtw_window`` is its
  ``window``, the largest shift allowed, None: any), then the same vote. It costs O(E^2) per pair
  (O(E x window) with a window) against O(E): at E = 100, 1,000-2,000x slower than Euclidean
  without a window and 200-300x with ``dtw_window=10`` (10-20 h and about 3 h for 1.28M samples
  against 1,000 references on 2 CPU cores), so its chunks are small (``DTW_PAIRS`` pairs) for
  timely progress.

A query row with a NaN (a sample not recorded in some epoch) or an infinity gets a row of NaN: no
distance to it means anything. References must be finite.
"""

from __future__ import annotations

import mmap
import numbers
from typing import Callable, Optional

import numpy as np
import torch

from vnodes.runtime.devices import choose_device
from vnodes.runtime.errors import InvalidJobSpec

METRICS = ("euclidean", "dtw")
BLOCK_BYTES = 64 * 2**20  # the float64 distance block of one chunk, when chunk_rows is not given
GPU_BLOCK_BYTES = 1024 * 2**20  # the same with device="cuda": fewer, larger launches
DTW_PAIRS = 2**18  # query-reference pairs per DTW chunk, when chunk_rows is not given
# A memory map is copied this many columns (epochs) at a time, its pages released in between: one
# page fault can map a whole page-cache folio (up to 2 MiB on x86-64 Linux), so copying all E epochs
# of a chunk at once would map up to E x 2 MiB of the file (200 MiB at E = 100), whatever chunk_rows.
READ_EPOCHS = 8


def knn_proba(references: np.ndarray, labels: np.ndarray, queries: np.ndarray, *, num_classes: int | None = None, k: int = 20,
              metric: str = "euclidean", chunk_rows: int | None = None, dtw_window: int | None = None,
              progress: Callable[[int, int], None] | None = None,
              device: str | torch.device = "cpu") -> np.ndarray:
    """p(class) of every query: the fraction of its ``k`` nearest references in each class.

    What scikit-learn's ``KNeighborsClassifier(k).fit(references, labels).predict_proba(queries)``
    returns (uniform weights, Euclidean), computed in chunks of rows (module docstring).

    Args:
        references: ``[R, E]`` trajectories of the reference probes (finite).
        labels: ``[R]`` integer class of each reference, in ``[0, num_classes)``.
        queries: ``[N, E]`` array-like, e.g. ``load_dynamics(run_dir).loss`` (a memory map: read
            ``chunk_rows`` rows at a time, never whole).
        num_classes: columns of the result (default ``labels.max() + 1``); a class no reference has
            gets 0.
        k: neighbours in the vote (MAP-D: 20), ``1 <= k <= R``.
        metric: ``"euclidean"`` or ``"dtw"`` (dynamic time warping, through ``dtaidistance``).
        chunk_rows: query rows per chunk (default: the distance block under ``BLOCK_BYTES`` for
            Euclidean, ``DTW_PAIRS`` pairs for DTW).
        dtw_window: with ``metric="dtw"``: the largest shift allowed (dtaidistance's ``window``);
            None allows any.
        progress: called as ``progress(rows_done, N)`` after each chunk.
        device: where the Euclidean distances and the vote are computed: ``"cpu"`` (default) or a
            CUDA device (``"cuda"``, ``"cuda:1"``), still in float64 and chunk by chunk (the rows are
            read on the host and copied over; chunks default to ``GPU_BLOCK_BYTES``). The result is
            the CPU's, tie for tie. DTW runs on the CPU only.

    Returns:
        float32 ``[N, num_classes]``; rows sum to 1, except the rows of queries holding a NaN or an
        infinity, which are NaN.

    Raises:
        ValueError, TypeError: a bad argument (the message names it and the fix), before any work.
        ImportError: ``metric="dtw"`` without ``dtaidistance`` (or without its C library).
    """
    refs, labels, queries, num_classes = _checked(references, labels, queries, num_classes, k, metric,
                                                  chunk_rows, dtw_window, progress)
    device = _checked_device(device, metric)
    if metric == "euclidean":
        distances = _Euclidean(refs, torch.float64, device)
        block = GPU_BLOCK_BYTES if device.type == "cuda" else BLOCK_BYTES
        rows = chunk_rows or max(1, block // (8 * len(refs)))
    else:
        distances = _DTW(refs, None if dtw_window is None else int(dtw_window))
        rows = chunk_rows or max(1, DTW_PAIRS // len(refs))
    return _proba(distances, labels, queries, num_classes, int(k), int(rows), progress)


def _checked(references, labels, queries, num_classes, k, metric, chunk_rows, dtw_window, progress):
    """The arguments as arrays, or the first thing wrong with them (nothing has been computed yet)."""
    if metric not in METRICS:
        raise ValueError(f"knn_proba(metric={metric!r}): must be one of {METRICS}")
    refs = np.asarray(references)
    if refs.ndim != 2 or refs.shape[0] == 0 or refs.shape[1] == 0:
        raise ValueError(f"knn_proba: references of shape {refs.shape}; need [R, E] with R >= 1 references of "
                         "E >= 1 epochs")
    if not _is_real(refs.dtype):
        raise TypeError(f"knn_proba: references of dtype {refs.dtype}; need real numbers (float32/float64)")
    refs = refs.astype(np.float64)
    bad = int((~np.isfinite(refs)).any(axis=1).sum())
    if bad:
        raise ValueError(f"knn_proba: {bad} of {len(refs)} reference rows hold NaN or infinity (a probe not "
                         "recorded in some epoch?); drop those rows (and their labels), or keep only the epochs "
                         "every probe was recorded in")
    labels = np.asarray(labels)
    if labels.shape != (len(refs),):
        raise ValueError(f"knn_proba: labels of shape {labels.shape} for {len(refs)} references; need one "
                         f"label per reference row, shape ({len(refs)},)")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"knn_proba: labels of dtype {labels.dtype}; need integer class indices "
                        "(e.g. labels.astype(np.int64) if they are whole numbers)")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"knn_proba: label {int(labels.min())} < 0; labels must be class indices "
                         "0..num_classes-1 (map them, e.g. with np.unique(labels, return_inverse=True))")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"knn_proba(num_classes={num_classes!r}): must be an integer >= 1, or None for "
                         "labels.max() + 1")
    num_classes = int(num_classes)
    if labels.max() >= num_classes:
        raise ValueError(f"knn_proba: label {int(labels.max())} >= num_classes={num_classes}; labels must be "
                         "class indices 0..num_classes-1: raise num_classes, or map the labels")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"knn_proba(k={k!r}): must be an integer >= 1 (MAP-D uses 20)")
    if k > len(refs):
        raise ValueError(f"knn_proba(k={k}): only {len(refs)} references to vote; lower k to at most "
                         f"{len(refs)}, or add references")
    if not isinstance(queries, np.ndarray):
        queries = np.asarray(queries)  # a list or a CPU tensor; a memory map stays one
    if queries.ndim != 2 or queries.shape[1] != refs.shape[1]:
        raise ValueError(f"knn_proba: queries of shape {queries.shape} against references of {refs.shape[1]} "
                         f"epochs; need [N, {refs.shape[1]}]: the same epochs as the references")
    if not _is_real(queries.dtype):
        raise TypeError(f"knn_proba: queries of dtype {queries.dtype}; need real numbers (float32/float64)")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral)
                                   or chunk_rows < 1):
        raise ValueError(f"knn_proba(chunk_rows={chunk_rows!r}): must be an integer >= 1, or None to size "
                         "chunks automatically")
    if dtw_window is not None:
        if metric != "dtw":
            raise ValueError(f"knn_proba(dtw_window={dtw_window!r}) with metric={metric!r}: the window applies "
                             "to metric='dtw' only; drop it or set metric='dtw'")
        if isinstance(dtw_window, bool) or not isinstance(dtw_window, numbers.Integral) or dtw_window < 1:
            raise ValueError(f"knn_proba(dtw_window={dtw_window!r}): must be an integer >= 1 (1: no warping), "
                             "or None for any shift")
    if progress is not None and not callable(progress):
        raise TypeError(f"knn_proba(progress={progress!r}): must be a callable (rows_done, rows_total), or None")
    return refs, labels, queries, num_classes


def _checked_device(device, metric: str) -> torch.device:
    """``device`` as a ``torch.device`` the vote can run on (``runtime.devices.choose_device``'s
    rules: cpu, cuda or cuda:K of this machine), or a clear error before any work."""
    if str(device).startswith("cuda") and metric != "euclidean":
        raise ValueError(f"knn_proba(device={device!r}) with metric={metric!r}: DTW runs on the CPU only; "
                         "drop device")
    try:
        return torch.device(choose_device(str(device), None, torch.cuda.device_count()))
    except InvalidJobSpec as exc:
        raise ValueError(f"knn_proba(device={device!r}): {exc.message}") from None


def _is_real(dtype: np.dtype) -> bool:
    return dtype.kind in "fiu"


def _proba(distances: Callable[[np.ndarray], torch.Tensor], labels: np.ndarray, queries: np.ndarray,
           num_classes: int, k: int, chunk_rows: int, progress: Optional[Callable[[int, int], None]]) -> np.ndarray:
    """The vote, chunk by chunk (arguments already checked)."""
    n = len(queries)
    out = np.empty((n, num_classes), np.float32)
    device = getattr(distances, "device", torch.device("cpu"))
    label_of = torch.from_numpy(labels).to(device)
    release = _page_releaser(queries)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        rows = _read_rows(queries, start, stop, release)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            rows = np.where(finite[:, None], rows, 0)  # a copy: never write into the caller's array
        nearest = _nearest(distances(rows), k)
        counts = torch.zeros(stop - start, num_classes, dtype=torch.float64, device=device)
        counts.scatter_add_(1, label_of[nearest], torch.ones(nearest.shape, dtype=torch.float64, device=device))
        out[start:stop] = (counts / k).cpu().numpy()
        out[start:stop][~finite] = np.nan
        if progress is not None:
            progress(stop, n)
    return out


def _nearest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, k]`` indices of each row's k smallest distances; a tie at the k-th goes to the lower index.

    ``topk`` orders ties arbitrarily, so it is asked for k + 1: where the k-th and the (k+1)-th
    distances differ, its first k are the only possible answer; where they are equal, the row is
    decided again, exactly (``_break_ties``)."""
    r = dist.shape[1]
    values, index = torch.topk(dist, min(k + 1, r), dim=1, largest=False, sorted=True)
    nearest = index[:, :k]
    if k == r:
        return nearest
    tied = torch.nonzero(values[:, k - 1] == values[:, k]).flatten()
    group = max(1, len(dist) // 4)  # bounds the extra memory to a quarter of the block's rows at a time
    for i in range(0, len(tied), group):
        rows = tied[i:i + group]
        nearest[rows] = _break_ties(dist[rows], values[rows, k - 1], k)  # dist[rows]: a copy
    return nearest


def _break_ties(dist: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th distance ``kth`` is tied: every closer reference, then the tied ones by index.
    Overwrites ``dist`` (the caller's copy) with the sort key: -1 closer, the index if tied, else inf."""
    kth = kth[:, None]
    closer, tied = dist < kth, dist == kth
    dist[:] = torch.arange(dist.shape[1], dtype=dist.dtype, device=dist.device)
    dist.masked_fill_(~tied, float("inf"))
    dist.masked_fill_(closer, -1.0)
    return torch.topk(dist, k, dim=1, largest=False, sorted=True).indices


class _Euclidean:
    """``|r|^2 - 2 q.r`` for every query row and reference: ``|q - r|^2`` less ``|q|^2``, the same
    order within a row. ``dtype`` float64 is what ``knn_proba`` uses (float32: for the benchmark)."""

    def __init__(self, refs: np.ndarray, dtype: torch.dtype, device: torch.device = torch.device("cpu")):
        self.refs = torch.from_numpy(refs).to(device=device, dtype=dtype)
        self.sq_norms = (self.refs * self.refs).sum(dim=1)
        self.dtype, self.device = dtype, device

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        q = torch.from_numpy(rows).to(device=self.device, dtype=self.dtype)
        return torch.addmm(self.sq_norms, q, self.refs.T, beta=1, alpha=-2)


class _DTW:
    """Dynamic time warping distances (``dtaidistance``, C and OpenMP), one block per chunk."""

    def __init__(self, refs: np.ndarray, window: Optional[int]):
        try:
            from dtaidistance import dtw
        except ImportError as exc:
            raise ImportError("knn_proba(metric='dtw') needs dtaidistance: pip install dtaidistance") from exc
        if not dtw.try_import_c():
            raise ImportError("knn_proba(metric='dtw'): dtaidistance's C library is not available (the pure Python "
                              "version would take days); reinstall dtaidistance from a wheel for this platform")
        self.dtw, self.refs, self.window = dtw, np.ascontiguousarray(refs, np.float64), window

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        r, n = len(self.refs), len(rows)
        series = np.concatenate([self.refs, rows.astype(np.float64)])
        # Only the block references x queries, row-major: [r, n].
        flat = self.dtw.distance_matrix_fast(series, block=((0, r), (r, r + n)), compact=True, window=self.window)
        return torch.from_numpy(np.frombuffer(flat, np.float64).reshape(r, n).T.copy())


def _read_rows(queries: np.ndarray, start: int, stop: int, release: Optional[Callable[[], None]]) -> np.ndarray:
    """Rows ``start:stop`` of ``queries``, copied (native byte order); for a memory map, ``READ_EPOCHS``
    columns at a time, its pages released after each."""
    dtype = queries.dtype.newbyteorder("=")
    if release is None:
        return np.ascontiguousarray(queries[start:stop], dtype=dtype)
    rows = np.empty((stop - start, queries.shape[1]), dtype)
    for epoch in range(0, queries.shape[1], READ_EPOCHS):
        rows[:, epoch:epoch + READ_EPOCHS] = queries[start:stop, epoch:epoch + READ_EPOCHS]
        release()
    return rows


def _page_releaser(queries: np.ndarray) -> Optional[Callable[[], None]]:
    """A function that drops ``queries``' memory-mapped pages from this process; None for an array in
    memory, or a copy-on-write map (its private pages would be lost)."""
    target = None
    for obj in _bases(queries):
        if isinstance(obj, np.memmap):
            if obj.mode == "c" or not isinstance(getattr(obj, "_mmap", None), mmap.mmap):
                return None
            target = obj._mmap
            break
    if target is None or not hasattr(target, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return None

    def release() -> None:
        try:
            target.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed, or refused: the pages just stay resident
            pass

    return release


def _bases(array: np.ndarray):
    obj = array
    while obj is not None:
        yield obj
        obj = getattr(obj, "base", None)
