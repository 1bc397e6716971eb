"""What the dynamics recorder costs: each measurement beside its anchor, measured in the same run.

    python benchmarks/plugins.py            # about 7 minutes on 2 CPU cores
    python benchmarks/plugins.py --smoke    # tiny sizes, well under a minute: checks the script itself

The job: a small MLP classifier (64 features -> 256 -> 256 -> 10 classes, ~85k parameters) on an
in-memory synthetic dataset (16,384 samples, class-dependent means: nothing is downloaded), 64
virtual nodes x 16 samples per step (1,024 samples, 16 steps per epoch), SGD, fast mode, sequential,
on the CPU with one intra-op thread per process. Rows, side by side in this one process:

1. **Per-step cost** (target <= 1.03x): ``train()`` with ``DynamicsRecorder(eval_pass=False)``
   against the same job without plugins, on 1 worker (in process) and on 3 local worker processes.
   Each run is a fresh job in a fresh run directory; runs are interleaved in pairs whose order
   alternates (with, without / without, with...). A run's step time is its steady state: the
   driver's ``on_step_end`` timestamps from the end of its first epoch (warm-up: building, the first
   steps) to its last step, divided by the steps in between; that window covers whole epochs, so the
   recorder's end-of-epoch write (one row per signal, fsynced) is in it. Reported: the medians, the
   median of the per-pair ratios, the workers' own compute time per step (``RunState.step_time_s``:
   forward, backward and the worker half's report, without the reduction and the commit), and the
   CPU time per step of every process of the job in the same window (this process, master threads
   included, plus the worker processes: ``psutil``), which a busy neighbour does not inflate.
2. **Evaluation pass against one training epoch** (target <= 0.4x), 1 worker, two ways:
   (a) on one ``StepEngine.build(spec)`` engine: ``evaluate(step, all nodes)`` against one epoch of
   ``compute`` + ``apply`` (worker side only: no master, no disk), interleaved;
   (b) through ``train()``: two-epoch jobs with ``DynamicsRecorder()`` and with
   ``DynamicsRecorder(eval_pass=False)``; the second epoch's window (``on_step_end`` of its last step
   minus that of the first epoch's last step) holds the first epoch's evaluation pass, master half and
   fsynced rows included, in the first job only. Ratio: (window with - window without) / window without.
3. **Worker half** (``RecorderWorker(None).report``): packing one step's 64 batches of 16 (10-class
   logits) into a report, beside the 1-worker step time of row 1; and one evaluation chunk (one batch
   of 256, the default ``eval_batch_size``).
4. **Recording at scale**, in a child process of its own (so its peak RSS is its own): a
   ``DynamicsRecorder`` master half attached to a 1.28M-sample job (1,024 samples per step: 1,250
   steps per epoch) fed ``SampleColumns`` reports as the master feeds them: ``on_step_committed``
   every step (a fresh permutation per epoch) and ``on_eval`` with a full-dataset report per epoch,
   for 100 epochs (``--epochs``). Reported: RSS and peak RSS before and after, samples recorded per
   second (time inside the recorder's calls only), the epoch-end writes, a mid-epoch ``state_dict``
   (what a checkpoint carries), the size on disk, then ``load_dynamics``: shape and the time to read
   one epoch for every sample (``loss[:, e]``: contiguous) and one sample across every epoch
   (``loss[i, :]``: one 4-byte read per epoch), from the page cache and cold (``posix_fadvise``
   ``DONTNEED`` first; the rows are fsynced, so the pages can be dropped).

The machine may be shared: every figure is a median, and rows 1 and 2 are pairs measured back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vnodes.runtime import Callback, JobSpec, RunState, StepEngine, train

from machine import header
from vnodes.runtime.plugins import PluginJob, SampleBatch, SampleColumns
from vnodes.scheduler.plugins import DynamicsRecorder, load_dynamics
from vnodes.scheduler.plugins.recorder import RecorderWorker

TARGET_STEP_RATIO = 1.03  # step time with the recorder (no evaluation pass) <= 1.03 x without
TARGET_EVAL_RATIO = 0.4  # one evaluation pass over the training set <= 0.4 x one training epoch
VNODES, VNODE_BATCH = 64, 16
FEATURES, CLASSES = 64, 10
MB = 1024 * 1024


# -- the workload (module level: worker processes import it) -------------------------------------

def synthetic(n: int, seed: int = 1234) -> TensorDataset:
    """``n`` samples of 64 features, 10 classes: Gaussian around one random mean per class."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, FEATURES, generator=g) + means[y]
    return TensorDataset(x, y)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


@dataclasses.dataclass(frozen=True)
class Workload:
    samples: int = 16_384
    hidden: int = 256
    virtual_nodes: int = VNODES
    vnode_batch_size: int = VNODE_BATCH
    threads: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return (self.samples // self.virtual_nodes) // self.vnode_batch_size

    def spec(self, plugins: list) -> JobSpec:
        return JobSpec(model=functools.partial(mlp, self.hidden), dataset=functools.partial(synthetic, self.samples),
                       optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), loss=per_sample_loss,
                       virtual_nodes=self.virtual_nodes, vnode_batch_size=self.vnode_batch_size, seed=0,
                       deterministic=False, device="cpu", num_threads=self.threads, plugins=plugins)


# -- timing through train() -------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time so far of this process (every thread: the master's too) and of its live children
    (the local workers)."""
    total = time.process_time()
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except ImportError:
        pass
    return total


class StepClock(Callback):
    """The driver's view of each committed step: when it was seen, the workers' compute time, and
    the CPU time of every process of the job at the two ends of the timed window."""

    def __init__(self, marks: tuple[int, ...] = ()):
        self.at: dict[int, float] = {}  # step index (0-based) -> perf_counter at its on_step_end
        self.compute: dict[int, float] = {}
        self.marks, self.cpu = set(marks), {}

    def on_step_end(self, state: RunState) -> None:
        step = state.step - 1
        self.at[step] = time.perf_counter()
        self.compute[step] = state.step_time_s
        if step in self.marks:
            self.cpu[step] = cpu_seconds()
            self.at[step] = time.perf_counter()  # the window starts after this reading, ends before the next

    def per_step(self, first: int, last: int) -> float:
        """Seconds per step from the end of step ``first`` to the end of step ``last``."""
        return (self.at[last] - self.at[first]) / (last - first)


@dataclasses.dataclass
class Run:
    step_s: float  # steady state, wall clock, per step
    compute_s: float  # median of the workers' compute time per step in the same window
    cpu_s: float  # CPU seconds per step in the window, every process of the job (master and workers)
    total_s: float  # train()'s wall time


def run_job(spec: JobSpec, steps: int, workers: int, first: int) -> Run:
    """One fresh job of ``steps`` steps; the steady state from the end of step ``first`` on."""
    clock = StepClock((first, steps - 1))
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="vnodes-bench-plugins-") as tmp:
        result = train(spec, steps=steps, checkpoint_dir=tmp, workers=workers, callbacks=[clock], progress=False)
    last = steps - 1
    missing = [s for s in range(first, steps) if s not in clock.at]
    if missing:
        raise RuntimeError(f"no on_step_end for steps {missing[:5]}...")
    compute = statistics.median(clock.compute[s] for s in range(first + 1, steps))
    cpu = (clock.cpu[last] - clock.cpu[first]) / (last - first)
    return Run(clock.per_step(first, last), compute, cpu, result.wall_time_s)


@dataclasses.dataclass
class Pairs:
    name: str
    with_: list[Run] = dataclasses.field(default_factory=list)
    without: list[Run] = dataclasses.field(default_factory=list)

    def ratios(self) -> list[float]:
        return [w.step_s / o.step_s for w, o in zip(self.with_, self.without)]

    @staticmethod
    def median(runs: list[Run], field: str = "step_s") -> float:
        return statistics.median(getattr(r, field) for r in runs)


def interleave(name: str, repeats: int, with_run: Callable[[], Run], without_run: Callable[[], Run],
               progress: Callable[[str], None]) -> Pairs:
    """``repeats`` back-to-back pairs, the order alternating. No warm-up pair: every run is a fresh
    job, and its window starts after its own first epoch (imports, building, first steps)."""
    pairs = Pairs(name)
    for r in range(repeats):
        if r % 2 == 0:
            pairs.with_.append(with_run())
            pairs.without.append(without_run())
        else:
            pairs.without.append(without_run())
            pairs.with_.append(with_run())
        progress(f"  {name}: {r + 1}/{repeats} pairs; step with {pairs.with_[-1].step_s * 1e3:.1f} ms, without "
                 f"{pairs.without[-1].step_s * 1e3:.1f} ms")
    return pairs


def step_cost(work: Workload, workers: int, epochs: int, repeats: int, progress) -> Pairs:
    spe = work.steps_per_epoch
    with_spec = work.spec([DynamicsRecorder(eval_pass=False)])
    without_spec = work.spec([])
    steps = epochs * spe
    return interleave(f"{workers} worker(s)", repeats,
                      lambda: run_job(with_spec, steps, workers, spe - 1),
                      lambda: run_job(without_spec, steps, workers, spe - 1), progress)


def eval_through_train(work: Workload, repeats: int, progress) -> Pairs:
    """Two-epoch jobs; the window of epoch 1 holds epoch 0's evaluation pass in the ``with`` job only."""
    spe = work.steps_per_epoch
    with_spec = work.spec([DynamicsRecorder()])
    without_spec = work.spec([DynamicsRecorder(eval_pass=False)])
    return interleave("eval pass via train()", repeats,
                      lambda: run_job(with_spec, 2 * spe, 1, spe - 1),
                      lambda: run_job(without_spec, 2 * spe, 1, spe - 1), progress)


# -- the evaluation pass on one engine --------------------------------------------------------------

@dataclasses.dataclass
class EngineEval:
    epoch_s: list[float]
    eval_s: list[float]
    eval_samples: int

    def ratios(self) -> list[float]:
        return [e / t for e, t in zip(self.eval_s, self.epoch_s)]


def eval_on_engine(work: Workload, repeats: int, progress) -> EngineEval:
    torch.set_num_threads(work.threads)
    engine = StepEngine.build(work.spec([DynamicsRecorder()]))
    n, spe = work.virtual_nodes, engine.sampler.steps_per_epoch
    state = {"step": 0}

    def one_epoch() -> float:
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(spe):
            s = state["step"]
            partial = engine.compute(s, engine.loader.iterate((s, v) for v in range(n)))
            engine.apply(partial.payload, partial.used)  # one worker: its partial is the total
            state["step"] = s + 1
        return time.perf_counter() - t0

    evaluated = [0]

    def one_pass() -> float:
        gc.collect()
        t0 = time.perf_counter()
        reports = engine.evaluate(state["step"], range(n))
        elapsed = time.perf_counter() - t0
        evaluated[0] = len(reports["recorder"])
        return elapsed

    one_epoch(), one_pass()  # warm-up
    out = EngineEval([], [], 0)
    for r in range(repeats):
        if r % 2 == 0:
            out.epoch_s.append(one_epoch())
            out.eval_s.append(one_pass())
        else:
            out.eval_s.append(one_pass())
            out.epoch_s.append(one_epoch())
        progress(f"  eval pass on an engine: {r + 1}/{repeats}; epoch {out.epoch_s[-1] * 1e3:.0f} ms, "
                 f"pass {out.eval_s[-1] * 1e3:.0f} ms")
    out.eval_samples = evaluated[0]
    return out


# -- the worker half ------------------------------------------------------------------------------

def worker_half_cost(repeats: int, calls: int) -> tuple[float, float]:
    """Median seconds per ``report``: one step (64 batches of 16), one evaluation chunk (1 batch of 256)."""
    g = torch.Generator().manual_seed(0)
    half = RecorderWorker(None)

    def batch(source: str, v: int, size: int) -> SampleBatch:
        idx = torch.randint(0, 1_000_000, (size,), generator=g)
        logits = torch.randn(size, CLASSES, generator=g)
        targets = torch.randint(0, CLASSES, (size,), generator=g)
        return SampleBatch(source, 0, v, idx, per_sample_loss(logits, targets), logits, targets)

    step_batches = [batch("train", v, VNODE_BATCH) for v in range(VNODES)]
    eval_batch = [batch("eval", 0, 256)]

    def timed(batches) -> float:
        half.report(batches)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                half.report(batches)
            runs.append((time.perf_counter() - t0) / calls)
        return statistics.median(runs)

    return timed(step_batches), timed(eval_batch)


# -- recording at scale (a child process) --------------------------------------------------------------

def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _drop_cache(directory: Path) -> bool:
    """Evict the (clean, fsynced) pages of the recording from the page cache; False: not possible here."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def record_at_scale(samples: int, epochs: int, per_step: int, out: Optional[str]) -> dict:
    """The child: feed a recorder's master half; everything measured goes to stdout as JSON."""
    if samples % per_step:
        raise ValueError(f"{per_step} samples per step must divide {samples}")
    spe = samples // per_step
    rng = np.random.default_rng(0)
    # The values are drawn once (not timed); each step's report holds views of them.
    pool = {"loss": rng.exponential(1.0, samples).astype(np.float32),
            "margin": rng.uniform(-1, 1, samples).astype(np.float32),
            "true_prob": rng.uniform(0, 1, samples).astype(np.float32)}
    everyone = np.arange(samples, dtype=np.int64)
    tmp = tempfile.mkdtemp(prefix="vnodes-bench-dynamics-", dir=out)
    run_dir = Path(tmp)
    gc.collect()
    before = {"rss": _rss(), "maxrss": _maxrss()}
    recorder = DynamicsRecorder()
    recorder.on_attach(PluginJob(num_samples=samples, virtual_nodes=VNODES, vnode_batch_size=per_step // VNODES,
                                 steps_per_epoch=spe, steps=epochs * spe, seed=0, deterministic=False,
                                 run_dir=run_dir))
    t_steps = t_last = t_eval = t_perm = 0.0
    state_s, state_bytes = 0.0, 0
    wall0 = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(samples)
        t_perm += time.perf_counter() - t0
        for k in range(spe):
            rows = slice(k * per_step, (k + 1) * per_step)
            idx = perm[rows]
            # As the master receives it: indices and float32 columns, in one report per step.
            report = SampleColumns(idx, {name: values[rows] for name, values in pool.items()})
            t0 = time.perf_counter()
            recorder.on_step_committed(epoch * spe + k, report)
            dt = time.perf_counter() - t0
            if k == spe - 1:
                t_last += dt  # the epoch's row goes to disk here
            else:
                t_steps += dt
            if epoch == 0 and k == spe // 2:  # a checkpoint mid-epoch: the partial row travels in it
                t0 = time.perf_counter()
                state = recorder.state_dict()
                state_s = time.perf_counter() - t0
                state_bytes = sum(t.numel() * t.element_size() for t in state["row"].values())
                del state
        report = SampleColumns(everyone, {name: np.roll(values, epoch) for name, values in pool.items()})
        t0 = time.perf_counter()
        recorder.on_eval(epoch, report)
        t_eval += time.perf_counter() - t0
        del report
    recorder.on_fit_end()
    wall = time.perf_counter() - wall0
    gc.collect()
    after = {"rss": _rss(), "maxrss": _maxrss()}

    directory = run_dir / "dynamics"
    files = sorted(directory.iterdir())
    size = sum(p.stat().st_size for p in files)
    allocated = sum(p.stat().st_blocks * 512 for p in files)
    t0 = time.perf_counter()
    load_dynamics(run_dir)
    t_load = time.perf_counter() - t0
    col_e, row_i = epochs // 2, samples // 3
    readers = {"column": lambda d: np.array(d.loss[:, col_e]), "row": lambda d: np.array(d.loss[row_i, :])}
    reads = {}
    # Cold first (pages mapped by a live memmap cannot be dropped), each read through a fresh
    # load_dynamics, as a reader would open the recording once and read what it needs.
    cold = _drop_cache(directory)
    for label, repeats in (("cold", 1 if cold else 0), ("cached", 5)):
        for kind, read in readers.items():
            times = []
            for _ in range(repeats):
                if label == "cold":
                    _drop_cache(directory)
                fresh = load_dynamics(run_dir)
                t0 = time.perf_counter()
                read(fresh)
                times.append(time.perf_counter() - t0)
                del fresh
            if times:
                reads[f"{kind}_{label}_s"] = statistics.median(times)
    dyn = load_dynamics(run_dir)
    train_dyn = load_dynamics(run_dir, "train")
    # What was recorded is what was fed (the last epoch: its permutation is the last ``perm``).
    last = epochs - 1
    probe = perm[:5]
    fed_train = pool["loss"][:5]
    fed_eval = np.roll(pool["loss"], last)[probe]
    exact = bool(np.array_equal(train_dyn.loss[probe, last], fed_train)
                 and np.array_equal(dyn.loss[probe, last], fed_eval))
    nan_free = bool(not np.isnan(dyn.loss[:, last]).any() and not np.isnan(train_dyn.loss[:, last]).any())
    peak_after_read = _maxrss()
    result = {
        "samples": samples, "epochs": epochs, "per_step": per_step, "steps_per_epoch": spe,
        "before": before, "after": after, "maxrss_after_reads": peak_after_read,
        "wall_s": wall, "steps_s": t_steps, "epoch_end_s": t_last, "eval_s": t_eval, "perm_s": t_perm,
        "state_dict_s": state_s, "state_dict_bytes": state_bytes,
        "files": len(files), "bytes": size, "allocated": allocated,
        "shape": list(dyn.loss.shape), "train_shape": list(train_dyn.loss.shape), "signals": sorted(dyn.signals),
        "load_s": t_load, "exact": exact, "nan_free": nan_free, **reads,
    }
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return result


def run_child(samples: int, epochs: int, per_step: int, out: Optional[str], timeout_s: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child-recording", f"{samples},{epochs},{per_step}"]
    if out:
        command += ["--dir", out]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"the recording child failed with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report -------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def _q(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def _verdict(passed: bool) -> str:
    return "[green]ok[/green]" if passed else "[red]missed[/red]"


def print_tables(console, work: Workload, step_pairs: list[Pairs], engine_eval: EngineEval, train_eval: Pairs,
                 half: tuple[float, float], scale: Optional[dict], epochs: int) -> bool:
    from rich.markup import escape
    from rich.table import Table

    ok = True
    console.print(header("torch", "numpy"), highlight=False)
    table = Table(title=f"DynamicsRecorder cost: MLP {FEATURES}-{work.hidden}-{work.hidden}-{CLASSES}, "
                  f"{work.samples:,} synthetic samples, {work.virtual_nodes} x {work.vnode_batch_size} per step "
                  f"({work.steps_per_epoch} steps/epoch), CPU, {work.threads} thread(s) per process, fast mode; "
                  f"step times: steady state over the last {epochs - 1} of {epochs} epochs of each run")
    for name, justify in (("measurement", "left"), ("with", "right"), ("anchor (same run)", "right"),
                          ("ratio", "right"), ("pairs\np25-p75", "right"), ("target", "right"), ("", "center"),
                          ("worker compute/step\nwith / without", "right"),
                          ("CPU/step, all processes\nwith / without", "right")):
        table.add_column(name, justify=justify)
    for p in step_pairs:
        ratio = statistics.median(p.ratios())
        passed = ratio <= TARGET_STEP_RATIO
        ok &= passed
        table.add_row(f"step, DynamicsRecorder(eval_pass=False) vs no plugin, {p.name}, {len(p.with_)} pairs",
                      _ms(Pairs.median(p.with_)), _ms(Pairs.median(p.without)), f"{ratio:.3f}x", _q(p.ratios()),
                      f"<= {TARGET_STEP_RATIO:.2f}x", _verdict(passed),
                      f"{_ms(Pairs.median(p.with_, 'compute_s'))} / {_ms(Pairs.median(p.without, 'compute_s'))}",
                      f"{_ms(Pairs.median(p.with_, 'cpu_s'))} / {_ms(Pairs.median(p.without, 'cpu_s'))}")
    ratio = statistics.median(engine_eval.ratios())
    passed = ratio <= TARGET_EVAL_RATIO
    ok &= passed
    table.add_row(f"eval pass (a): StepEngine.evaluate, {engine_eval.eval_samples:,} samples, vs one epoch of "
                  f"compute + apply; {len(engine_eval.eval_s)} pairs",
                  _ms(statistics.median(engine_eval.eval_s)), _ms(statistics.median(engine_eval.epoch_s)),
                  f"{ratio:.3f}x", _q(engine_eval.ratios()), f"<= {TARGET_EVAL_RATIO:.1f}x", _verdict(passed), "", "")
    extra = [w.step_s - o.step_s for w, o in zip(train_eval.with_, train_eval.without)]
    spe = work.steps_per_epoch
    ratios = [d / o.step_s for d, o in zip(extra, train_eval.without)]
    ratio = statistics.median(ratios)
    passed = ratio <= TARGET_EVAL_RATIO
    ok &= passed
    table.add_row(f"eval pass (b): train(), 1 worker, epoch window with eval_pass minus without, vs that "
                  f"epoch; {len(extra)} pairs",
                  _ms(statistics.median(extra) * spe), _ms(Pairs.median(train_eval.without) * spe),
                  f"{ratio:.3f}x", _q(ratios), f"<= {TARGET_EVAL_RATIO:.1f}x", _verdict(passed), "", "")
    anchor = Pairs.median(step_pairs[0].without)
    table.add_row(f"worker half: RecorderWorker.report of one step ({VNODES} x {VNODE_BATCH}), vs the step "
                  f"(no plugin, {step_pairs[0].name})", _us(half[0]), _ms(anchor),
                  f"{half[0] / anchor:.3f}x", "-", "", "", "", "")
    table.add_row("worker half: RecorderWorker.report of one evaluation chunk (1 x 256)", _us(half[1]), "", "", "", "", "",
                  "", "")
    console.print(table)

    if scale is None:
        return ok
    s = scale
    recorded = s["samples"] * s["epochs"]
    table = Table(title=f"Recording at scale: {s['samples']:,} samples x {s['epochs']} epochs through the "
                  f"master half ({s['per_step']:,} samples per step, {s['steps_per_epoch']:,} steps per epoch; "
                  "train and eval sources, 3 signals each)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("RSS before / after", f"{s['before']['rss'] / MB:,.1f} / {s['after']['rss'] / MB:,.1f} MiB",
                  "current resident set, after attaching / after on_fit_end")
    table.add_row("peak RSS before / after", f"{s['before']['maxrss'] / MB:,.1f} / {s['after']['maxrss'] / MB:,.1f} "
                  "MiB", f"ru_maxrss; growth {(s['after']['maxrss'] - s['before']['maxrss']) / MB:,.1f} MiB")
    table.add_row("training pass: on_step_committed", f"{recorded / (s['steps_s'] + s['epoch_end_s']):,.0f} "
                  "samples/s", f"{s['steps_s']:.1f} s in steps + {s['epoch_end_s']:.1f} s in epoch-end writes; "
                  f"{_us(s['steps_s'] / max(1, s['epochs'] * (s['steps_per_epoch'] - 1)))} per step")
    table.add_row("training pass: epoch-end write", _ms(s["epoch_end_s"] / s["epochs"]),
                  f"per epoch: 3 rows of {s['samples'] * 4 / MB:.1f} MiB, fsynced, and meta.json")
    table.add_row("evaluation pass: on_eval", f"{recorded / s['eval_s']:,.0f} samples/s",
                  f"{_ms(s['eval_s'] / s['epochs'])} per epoch (scatter + 3 rows written, fsynced)")
    table.add_row("all recorder calls", f"{2 * recorded / (s['steps_s'] + s['epoch_end_s'] + s['eval_s']):,.0f} "
                  "samples/s", f"{2 * recorded:,} samples recorded; loop wall {s['wall_s']:.1f} s "
                  f"(permutations {s['perm_s']:.1f} s, not the recorder's)")
    table.add_row("state_dict mid-epoch (checkpoint)", _ms(s["state_dict_s"]),
                  f"{s['state_dict_bytes'] / MB:.1f} MiB of partial rows copied into the checkpoint")
    table.add_row("on disk", f"{s['bytes'] / MB:,.1f} MiB",
                  f"{s['files']} files ({s['allocated'] / MB:,.1f} MiB allocated); "
                  f"expected {2 * 3 * recorded * 4 / MB:,.1f} MiB")
    table.add_row("load_dynamics", f"{s['shape'][0]:,} x {s['shape'][1]}",
                  escape(f"eval {s['shape']}, train {s['train_shape']}, signals {s['signals']}; "
                  f"{_ms(s['load_s'])} to open; values as fed: {s['exact']}, last epoch NaN-free: {s['nan_free']}"))
    for kind, what in (("column", "loss[:, e]: one epoch, every sample (contiguous)"),
                       ("row", "loss[i, :]: one sample, every epoch (strided)")):
        cold = s.get(f"{kind}_cold_s")
        table.add_row(escape(f"read {what}"), _ms(s[f"{kind}_cached_s"]),
                      "from the page cache, fresh load_dynamics each read" +
                      (f"; cold (after posix_fadvise DONTNEED): {_ms(cold)}" if cold is not None
                       else "; cold not measured (no posix_fadvise)"))
    table.add_row("peak RSS after the reads", f"{s['maxrss_after_reads'] / MB:,.1f} MiB", "")
    console.print(table)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--repeats", type=int,
                        help="timed pairs per in-process row (default 9; smoke 2)")
    parser.add_argument("--repeats-workers", type=int,
                        help="timed pairs of the 3-worker row, ~12 s of process start-up per run (default 5; smoke 1)")
    parser.add_argument("--epochs", type=int, help="epochs of the recording at scale (default 100; smoke 2)")
    parser.add_argument("--samples", type=int, help="samples of the recording at scale (default 1,280,000)")
    parser.add_argument("--train-epochs", type=int, default=4,
                        help="epochs per timed train() run of the step-cost rows, the first one not timed "
                        "(default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default %(default)s)")
    parser.add_argument("--skip-scale", action="store_true", help="leave out the recording at scale")
    parser.add_argument("--dir", help="where the recording at scale writes (default: the system's temporary folder)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed "
                        "(noisy on a shared machine)")
    parser.add_argument("--child-recording", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_recording:
        samples, epochs, per_step = (int(x) for x in args.child_recording.split(","))
        print(json.dumps(record_at_scale(samples, epochs, per_step, args.dir)))
        return 0

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 180)

    def progress(line: str) -> None:
        console.print(line, style="dim", highlight=False)

    if args.smoke:
        work = Workload(samples=2048, hidden=32, threads=args.threads)  # 2 steps per epoch
        repeats, repeats_workers = args.repeats or 2, args.repeats_workers or 1
        epochs, samples, train_epochs = args.epochs or 2, args.samples or 64 * 1024, 2
    else:
        work = Workload(threads=args.threads)
        repeats, repeats_workers = args.repeats or 9, args.repeats_workers or 5
        epochs, samples, train_epochs = args.epochs or 100, args.samples or 1_280_000, max(2, args.train_epochs)
    torch.set_num_threads(work.threads)
    t0 = time.perf_counter()

    scale = None
    if not args.skip_scale:
        progress(f"recording {samples:,} samples x {epochs} epochs in a child process...")
        scale = run_child(samples, epochs, 1024, args.dir, timeout_s=3600)
        progress(f"  done: {scale['wall_s']:.0f} s in the recorder's loop")
    half = worker_half_cost(repeats=max(3, repeats), calls=20 if args.smoke else 200)
    step_pairs = [step_cost(work, 1, train_epochs, repeats, progress),
                  step_cost(work, 3, train_epochs, repeats_workers, progress)]
    engine_eval = eval_on_engine(work, repeats, progress)
    train_eval = eval_through_train(work, repeats, progress)
    progress(f"measured in {time.perf_counter() - t0:.0f} s")
    ok = print_tables(console, work, step_pairs, engine_eval, train_eval, half, scale, train_epochs)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
