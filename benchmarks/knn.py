"""MAP-D's kNN vote at ImageNet scale: ``knn_proba`` beside scikit-learn, measured in the same run.

    python benchmarks/knn.py            # about 5 minutes on 2 CPU cores
    python benchmarks/knn.py --smoke    # tiny sizes, well under a minute: checks the script itself

The table: 1,280,000 samples x 100 epochs (``--samples``, ``--epochs``) of float32 "losses", random
walks (a start in [1.5, 2.5], Gaussian steps of 0.1, and a drift per suite: 4 suites, each sample
drawn into one), written one epoch at a time by ``DynamicsStore.write_epoch`` (epoch-major, fsynced:
what the recorder writes) into a temporary run directory, and read through ``load_dynamics`` (the
transposed memory map). The reference probes: 250 and 500 samples per suite (1,000 and 2,000
references), drawn from the table, labelled with their suite. k = 20, as MAP-D. Rows, in one run:

1. **The whole table**: ``knn_proba`` on the memory map, in a child process that does only this (so
   its peak RSS is its own), once per reference count: wall and CPU time, samples/s, peak RSS
   against the table's size on disk. Peak RSS is ``VmHWM``; ``ru_maxrss`` is recorded too but is no
   use here: it keeps the parent's high-water mark across fork and exec (``_hwm``). RSS before the
   call: ``psutil``. The table is in the page cache (just written), so this is compute, not disk.
   Once more with 1,000 references through a copy-on-write map (``mode="c"``), whose pages
   ``knn_proba`` may not release: what the release saves.
2. **The anchor**: scikit-learn's ``KNeighborsClassifier(20).fit(refs).predict_proba`` on a
   50,000-row random subsample (in memory, float32), against ``knn_proba`` on the same rows, 3 runs
   each, interleaved; the medians, their ratio, and the agreement (max |difference|, rows that
   differ; the whole-table run's rows for the same samples are compared too).
3. **Float32 distances**, which ``knn_proba`` does not offer: the same subsample with the distance
   block in float32 (``knn._Euclidean(refs, torch.float32)``): speed, and how many votes change.
4. **DTW** (``metric="dtw"``, dtaidistance's C code): 400 queries x 1,000 references, without a
   window and with ``dtw_window=10``; samples/s and what the whole table would take.

The machine may be shared: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vnodes.scheduler.plugins import knn, load_dynamics

from machine import header
from vnodes.scheduler.plugins.recorder import DIRECTORY, DynamicsStore

K = 20
SUITES = 4
DRIFT = (-0.03, -0.01, 0.0, 0.02)  # per suite, per epoch
MB = 1024 * 1024


# -- the table -------------------------------------------------------------------------------------

def write_table(run_dir: Path, samples: int, epochs: int, seed: int = 0) -> np.ndarray:
    """The recording (module docstring); returns each sample's suite."""
    rng = np.random.default_rng(seed)
    suite = rng.integers(0, SUITES, samples).astype(np.int64)
    drift = np.asarray(DRIFT, np.float32)[suite]
    loss = rng.uniform(1.5, 2.5, samples).astype(np.float32)
    store = DynamicsStore(run_dir / DIRECTORY, samples)
    for epoch in range(epochs):
        loss += drift + np.float32(0.1) * rng.standard_normal(samples, dtype=np.float32)
        store.write_epoch("eval", epoch, {"loss": loss})
    return suite


def references(table: np.ndarray, suite: np.ndarray, per_suite: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``per_suite`` probes of each suite: their trajectories ``[R, E]`` and labels ``[R]``."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.sort(rng.choice(np.flatnonzero(suite == s), per_suite, replace=False))
                          for s in range(SUITES)])
    return np.ascontiguousarray(table[idx]), np.repeat(np.arange(SUITES), per_suite)


# -- the whole table, in a child process ---------------------------------------------------------------

def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _hwm() -> int:
    """This address space's peak RSS (``VmHWM``). Unlike ``ru_maxrss`` it starts afresh at exec:
    ``ru_maxrss`` keeps the high-water mark of the address space exec replaced, i.e. the parent's at
    fork, and the parent has read the table through its own map."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def whole_table(run_dir: Path, refs: int, mode: str) -> dict:
    """The child: ``knn_proba`` over the whole recording; what it measured as a dict (stdout: JSON)."""
    refs_x, labels = np.load(run_dir / f"refs{refs}.npy"), np.load(run_dir / f"labels{refs}.npy")
    loss = load_dynamics(run_dir).loss
    if mode != "r":  # the same file and layout, mapped copy-on-write
        loss = np.memmap(loss.base.filename, dtype="<f4", mode=mode, shape=loss.T.shape).T
    before = {"rss": _rss(), "maxrss": _maxrss(), "hwm": _hwm()}
    chunks: list[int] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    proba = knn.knn_proba(refs_x, labels, loss, num_classes=SUITES, k=K, progress=lambda done, n: chunks.append(done))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = {"rss": _rss(), "maxrss": _maxrss(), "hwm": _hwm()}
    suite = np.load(run_dir / "suite.npy")
    np.save(run_dir / f"proba{refs}{mode}.npy", proba)
    return {"refs": refs, "mode": mode, "samples": len(proba), "epochs": loss.shape[1], "wall_s": wall, "cpu_s": cpu,
            "before": before, "after": after, "chunks": len(chunks), "chunk_rows": chunks[0],
            "nan_rows": int(np.isnan(proba).any(axis=1).sum()),
            "recovered": float((proba.argmax(axis=1) == suite).mean()), "threads": torch.get_num_threads()}


def run_child(run_dir: Path, refs: int, mode: str, timeout_s: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", f"{run_dir},{refs},{mode}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"the child ({refs} references, mode {mode!r}) failed with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- in this process: the anchor, float32, DTW -------------------------------------------------------------

def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def anchor(sub: np.ndarray, refs: np.ndarray, labels: np.ndarray, repeats: int) -> dict:
    """sklearn and ``knn_proba`` (float64, and float32 distances) on the same in-memory rows, interleaved."""
    from sklearn.neighbors import KNeighborsClassifier

    ours = lambda: knn.knn_proba(refs, labels, sub, num_classes=SUITES, k=K)  # noqa: E731
    rows = max(1, knn.BLOCK_BYTES // (8 * len(refs)))
    single = lambda: knn._proba(knn._Euclidean(refs.astype(np.float64), torch.float32), labels, sub,  # noqa: E731
                                SUITES, K, rows, None)
    sklearn = lambda: KNeighborsClassifier(n_neighbors=K).fit(refs, labels).predict_proba(sub)  # noqa: E731
    ours(), single(), sklearn()  # warm-up
    t = {"ours": [], "f32": [], "sklearn": []}
    out = {}
    for r in range(repeats):
        order = (("ours", ours), ("f32", single), ("sklearn", sklearn))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            times, out[name] = timed(fn, 1)
            t[name] += times
    theirs = out["sklearn"]
    return {"times": t, "ours": out["ours"],
            "diff": float(np.abs(out["ours"] - theirs.astype(np.float32)).max()),
            "diff64": float(np.abs(out["ours"].astype(np.float64) - theirs).max()),
            "rows_differ": int((out["ours"] != theirs.astype(np.float32)).any(axis=1).sum()),
            "f32_rows_differ": int((out["f32"] != out["ours"]).any(axis=1).sum()),
            "f32_diff": float(np.abs(out["f32"] - out["ours"]).max())}


def dtw_rate(sub: np.ndarray, refs: np.ndarray, labels: np.ndarray, window) -> float:
    t0 = time.perf_counter()
    knn.knn_proba(refs, labels, sub, num_classes=SUITES, k=K, metric="dtw", dtw_window=window)
    return time.perf_counter() - t0


# -- the report ----------------------------------------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:,.2f} s" if seconds < 100 else f"{seconds:,.0f} s"


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def print_table(console, samples: int, epochs: int, table_bytes: int, full: list[dict], cow: dict | None,
                sub_n: int, a: dict, whole_equal: bool, dtw: list[tuple[str, int, int, float]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(header("torch", "numpy", "sklearn", extra=f"{torch.get_num_threads()} torch threads"), highlight=False)
    table = Table(title=f"knn_proba (k={K}, {SUITES} suites) on {samples:,} samples x {epochs} epochs of float32 "
                  f"random-walk losses; the table: {table_bytes / MB:,.1f} MiB on disk, epoch-major, read through "
                  "load_dynamics (page cache warm)")
    for name, justify in (("measurement", "left"), ("wall", "right"), ("samples/s", "right"),
                          ("speed ratio", "right"), ("peak RSS", "right"), ("note", "left")):
        table.add_column(name, justify=justify)
    for r in full + ([cow] if cow else []):
        growth = r["after"]["hwm"] - r["before"]["rss"]
        if r["mode"] == "r":
            what = f"whole table, memory map, {r['refs']:,} references"
            extra = (f"; {r['chunks']} chunks of {r['chunk_rows']:,} rows; argmax = generating suite for "
                     f"{r['recovered']:.1%}; NaN rows {r['nan_rows']}")
        else:
            what = f"  same, {r['refs']:,} references, copy-on-write map (pages never released)"
            extra = ": what releasing the map's pages saves"
        table.add_row(what, _s(r["wall_s"]), _rate(r["samples"], r["wall_s"]), "",
                      f"{r['after']['hwm'] / MB:,.0f} MiB",
                      f"{growth / MB:,.0f} MiB above the {r['before']['rss'] / MB:,.0f} MiB before the call "
                      f"({growth / table_bytes:.1%} of the table; ru_maxrss {r['after']['maxrss'] / MB:,.0f} MiB, "
                      f"the parent's mark); CPU {r['cpu_s']:,.1f} s ({r['threads']} threads){extra}")
    t = a["times"]
    sk, ours, f32 = (statistics.median(t[name]) for name in ("sklearn", "ours", "f32"))
    refs = full[0]["refs"]
    table.add_row(f"anchor: sklearn KNeighborsClassifier({K}).predict_proba, {sub_n:,}-row subsample, "
                  f"{refs:,} references", _s(sk), _rate(sub_n, sk), "1.00x", "",
                  f"median of {len(t['sklearn'])} (fit included); its brute-force ArgKmin, float64")
    table.add_row(f"knn_proba, same {sub_n:,} rows in memory", _s(ours), _rate(sub_n, ours), f"{sk / ours:.2f}x",
                  "", escape(f"vs sklearn cast to float32: max |diff| {a['diff']:.1g}, rows differing "
                             f"{a['rows_differ']}; vs its float64: max |diff| {a['diff64']:.1g}; the whole-table "
                             f"run's rows for these samples equal: {whole_equal}"))
    table.add_row("  float32 distance block (not offered), same rows", _s(f32), _rate(sub_n, f32),
                  f"{ours / f32:.2f}x vs float64", "",
                  f"votes changed on {a['f32_rows_differ']:,} of {sub_n:,} rows (max |diff| {a['f32_diff']:.2f})")
    euclid_rate = sub_n / ours
    for label, queries, n_refs, seconds in dtw:
        rate = queries / seconds
        table.add_row(f"DTW ({label}), {queries:,} queries x {n_refs:,} references", _s(seconds),
                      f"{rate:,.1f}", f"{rate / euclid_rate:.4f}x vs Euclidean", "",
                      f"the whole table would take ~{_duration(samples / rate * n_refs / refs)} with "
                      f"{refs:,} references")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--samples", type=int, help="samples in the table (default 1,280,000; smoke 20,000)")
    parser.add_argument("--epochs", type=int, help="epochs in the table (default 100; smoke 20)")
    parser.add_argument("--per-suite", type=int, nargs="+",
                        help="reference probes per suite, one whole-table run each (default 250 500; smoke 25 50)")
    parser.add_argument("--subsample", type=int, help="rows of the sklearn anchor (default 50,000; smoke 2,000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per side of the anchor (default %(default)s)")
    parser.add_argument("--dtw-queries", type=int, help="queries of the DTW rows (default 400; smoke 20)")
    parser.add_argument("--skip-cow", action="store_true", help="leave out the copy-on-write whole-table run")
    parser.add_argument("--dir", help="where the table is written (default: the system's temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run_dir, refs, mode = args.child.split(",")
        print(json.dumps(whole_table(Path(run_dir), int(refs), mode)))
        return 0

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)

    def progress(line: str) -> None:
        console.print(line, style="dim", highlight=False)

    smoke = args.smoke
    samples = args.samples or (20_000 if smoke else 1_280_000)
    epochs = args.epochs or (20 if smoke else 100)
    per_suite = args.per_suite or ([25, 50] if smoke else [250, 500])
    sub_n = min(samples, args.subsample or (2_000 if smoke else 50_000))
    dtw_queries = args.dtw_queries or (20 if smoke else 400)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vnodes-bench-knn-", dir=args.dir) as tmp:
        run_dir = Path(tmp)
        progress(f"writing {samples:,} x {epochs} float32 losses, epoch-major...")
        suite = write_table(run_dir, samples, epochs)
        np.save(run_dir / "suite.npy", suite)
        table = load_dynamics(run_dir).loss
        table_bytes = (run_dir / DIRECTORY / "eval.loss.f32").stat().st_size
        refs = {}
        for p in per_suite:
            refs[p] = references(table, suite, p)
            np.save(run_dir / f"refs{SUITES * p}.npy", refs[p][0])
            np.save(run_dir / f"labels{SUITES * p}.npy", refs[p][1])
        full = []
        for p in per_suite:
            progress(f"knn_proba over the whole table, {SUITES * p:,} references, in a child process...")
            full.append(run_child(run_dir, SUITES * p, "r", timeout_s=3600))
            progress(f"  {full[-1]['wall_s']:.1f} s")
        cow = None
        if not args.skip_cow:
            progress(f"again through a copy-on-write map, {SUITES * per_suite[0]:,} references...")
            cow = run_child(run_dir, SUITES * per_suite[0], "c", timeout_s=3600)
        first_refs, first_labels = refs[per_suite[0]]
        rows = np.sort(np.random.default_rng(2).choice(samples, sub_n, replace=False))
        sub = np.ascontiguousarray(table[rows])
        progress(f"anchor: sklearn and knn_proba on {sub_n:,} rows, {args.repeats} runs each...")
        a = anchor(sub, first_refs, first_labels, args.repeats)
        whole = np.load(run_dir / f"proba{SUITES * per_suite[0]}r.npy", mmap_mode="r")
        whole_equal = bool(np.array_equal(whole[rows], a["ours"]))
        dtw = []
        for label, window in (("no window", None), ("dtw_window=10", 10)):
            progress(f"DTW, {label}, {dtw_queries} queries...")
            dtw.append((label, dtw_queries, len(first_refs), dtw_rate(sub[:dtw_queries], first_refs, first_labels,
                                                                       window)))
        del table, whole
    progress(f"measured in {time.perf_counter() - t_start:.0f} s")
    print_table(console, samples, epochs, table_bytes, full, cow, sub_n, a, whole_equal, dtw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
