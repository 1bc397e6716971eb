"""Sharing a GPU cluster: the vnodes policy against the baselines, in the cluster simulator, on the
baselines' own traces; and the simulator's step-time model against the engine's measured steps.

    python benchmarks/cluster.py            # under a minute on 2 CPU cores
    python benchmarks/cluster.py --smoke    # Pollux workload-6 only, a short model check: about 10 s

**Simulations** (``vnodes.scheduler.cluster.simulator.simulate``; the policies are
``scheduler/cluster/policies.py``, the resize models ``ResizeModel``):

- Pollux's eight evaluation workloads (``workload-1..8.csv``, 160 jobs each) on 64 GPUs (16 nodes
  x 4), a decision every 60 s, as Pollux's simulator runs them. ``tiresias`` with a flat 30 s per
  start and resume (Pollux's Tiresias+TunedJobs); ``vnodes`` with vnodes' own costs
  (``vnodes_resize()``: 20 s for a worker to start while the job trains on, then a measured
  re-formation pause and the state transfer) and again with the flat 30 s, so that the policy is
  compared without its cheaper resizes; ``wfs``, ``fifo`` and ``priority`` with the flat 30 s
  (every Pollux job has priority 1, so ``priority`` schedules exactly as ``fifo``). Columns: the
  mean over the eight workloads of each one's average JCT (how Pollux reports it), the p99 of all
  1,280 JCTs pooled, the mean makespan and utilization (productive GPU-seconds over GPUs x
  makespan), and resizes and preemptions per job over all jobs.
- VirtualFlow's ``medium20_12jph`` (20 jobs, priorities 1/5/10) on 8 GPUs, deciding every 60 s and
  at every arrival and completion, as VirtualFlow's scheduler does: ``priority`` and ``wfs`` with
  VirtualFlow's measured overheads (``virtualflow_resize()``), ``vnodes`` with its own and with
  the flat 30 s.

**Targets.** Fidelity: our ``tiresias`` within +-15% of Pollux's published 4,038 s (mean of the
eight averages); our ``wfs`` and ``priority`` on medium20_12jph within +-15% of VirtualFlow's
development logs (1,713 s and 4,005 s average JCT). Ours: ``vnodes`` average JCT <= 0.75x our
simulated ``tiresias`` on the Pollux workloads, and below ``wfs`` on both trace sets; stretch:
Pollux's own 2,751 s.

**Model check.** The simulator prices a vnodes job on ``n`` GPUs by its slowest GPU, which runs
``ceil(V / n)`` virtual nodes: step time ~ ``ceil(V / n)`` x one virtual node's time
(``VirtualFlowProfile.step_time``). Measured here on this CPU: ``StepEngine`` (fast mode, one
intra-op thread) for one worker holding ``k = 1, 2, 4, 8`` of a job's 8 virtual nodes (a small
ResNet, 3 blocks, ~78k parameters, 16 samples of 3x32x32 per virtual node): ``compute`` of its
``k`` nodes then ``apply`` (what each worker does every step, less the reduction), sequential and
fused execution, against ``k`` x the measured ``k = 1`` time. Interleaved rounds; medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vnodes.scheduler.cluster.apps import TRACES_DIR, load_applications

from machine import header
from vnodes.scheduler.cluster.simulator import (Cluster, ResizeModel, SimResult, flat_resize, simulate,
                                                virtualflow_resize, vnodes_resize)
from vnodes.scheduler.cluster.workload import load_workload, pollux_workloads

PUBLISHED = TRACES_DIR / "pollux" / "published"
VF_TRACE = TRACES_DIR / "virtualflow" / "medium20_12jph.json"
FIDELITY_TOLERANCE = 0.15  # +-15% of a published or logged average JCT
TARGET_VS_TIRESIAS = 0.75  # vnodes average JCT <= 0.75x our tiresias
VIRTUALFLOW_LOGGED_S = {"wfs": 1713.0, "priority": 4005.0}  # medium20_12jph, VirtualFlow's development logs


@dataclasses.dataclass(frozen=True)
class Run:
    policy: str
    resize: ResizeModel

    @property
    def label(self) -> str:
        return f"{self.policy} / {self.resize.name}"


POLLUX_RUNS = (Run("tiresias", flat_resize(30)), Run("vnodes", vnodes_resize()), Run("vnodes", flat_resize(30)),
               Run("wfs", flat_resize(30)), Run("fifo", flat_resize(30)), Run("priority", flat_resize(30)))
VF_RUNS = (Run("priority", virtualflow_resize()), Run("wfs", virtualflow_resize()), Run("vnodes", vnodes_resize()),
           Run("vnodes", flat_resize(30)))


@dataclasses.dataclass
class Row:
    """One policy and resize model over one trace set (one or more workloads)."""

    trace: str
    run: Run
    results: list[SimResult]
    wall_s: float

    @property
    def avg_jct_s(self) -> float:  # mean of the per-workload averages, as Pollux reports
        return float(np.mean([r.metrics()["avg_jct_s"] for r in self.results]))

    @property
    def pooled(self) -> np.ndarray:
        return np.concatenate([np.fromiter(r.jcts().values(), dtype=float) for r in self.results])

    def mean(self, key: str) -> float:
        return float(np.mean([r.metrics()[key] for r in self.results]))

    def per_job(self, attribute: str) -> float:
        return float(np.mean([getattr(j, attribute) for r in self.results for j in r.jobs]))


def run_simulations(workloads: list[Path], progress: Callable[[str], None]) -> tuple[list[Row], list[Row]]:
    profiles = load_applications()
    traces = [load_workload(path, profiles) for path in workloads]
    pollux = []
    for run in POLLUX_RUNS:
        t0, results = time.perf_counter(), []
        for path, jobs in zip(workloads, traces):
            results.append(simulate(jobs, run.policy, Cluster(16, 4), run.resize, profiles))
        pollux.append(Row("pollux", run, results, time.perf_counter() - t0))
        progress(f"  pollux x{len(workloads)}: {run.label}: avg JCT {pollux[-1].avg_jct_s:,.0f} s "
                 f"({pollux[-1].wall_s:.1f} s)")
    jobs = load_workload(VF_TRACE, profiles)
    virtualflow = []
    for run in VF_RUNS:
        t0 = time.perf_counter()
        result = simulate(jobs, run.policy, Cluster.of(8), run.resize, profiles, on_events=True)
        virtualflow.append(Row("medium20_12jph", run, [result], time.perf_counter() - t0))
        progress(f"  medium20_12jph: {run.label}: avg JCT {virtualflow[-1].avg_jct_s:,.0f} s")
    return pollux, virtualflow


def published_mean(workloads: list[Path], policy: str) -> float:
    """Pollux's published mean of per-workload average JCTs, over these workloads."""
    avgs = json.loads((PUBLISHED / f"{policy}-1.0.json").read_text())["avgs"]
    return float(np.mean([avgs[path.stem] for path in workloads]))


# -- model check: the step-time model against the engine ----------------------------------------

MODEL_CHECK_VNODES = 8
MODEL_CHECK_K = (1, 2, 4, 8)


def _resnet(width: int = 16):
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import BasicBlock

    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def _dataset(n: int = 2048):
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1234)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1).float() * 0.1, y)


def _per_sample_loss(outputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, targets, reduction="none")


def model_check(rounds: int, steps: int, progress: Callable[[str], None]) -> dict[str, dict[int, float]]:
    """Median seconds per step of one worker holding k virtual nodes: execution -> k -> seconds."""
    import torch

    from vnodes.runtime import JobSpec, StepEngine

    torch.set_num_threads(1)
    out: dict[str, dict[int, float]] = {}
    for execution in ("sequential", "fused"):
        spec = JobSpec(model=_resnet, dataset=_dataset, loss=_per_sample_loss,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                       virtual_nodes=MODEL_CHECK_VNODES, vnode_batch_size=16, seed=0, deterministic=False,
                       device="cpu", num_threads=1, execution=execution)
        engine = StepEngine.build(spec)
        step = 0

        def run_steps(k: int, count: int) -> float:
            nonlocal step
            t0 = time.perf_counter()
            for _ in range(count):
                partial = engine.compute(step, engine.loader.iterate((step, v) for v in range(k)))
                engine.apply(partial.payload, partial.used)
                step += 1
            return (time.perf_counter() - t0) / count

        for k in MODEL_CHECK_K:  # warm-up
            run_steps(k, 1)
        times: dict[int, list[float]] = {k: [] for k in MODEL_CHECK_K}
        for r in range(rounds):
            order = MODEL_CHECK_K if r % 2 == 0 else MODEL_CHECK_K[::-1]
            for k in order:
                times[k].append(run_steps(k, steps))
        out[execution] = {k: statistics.median(v) for k, v in times.items()}
        progress(f"  model check, {execution}: " + ", ".join(f"k={k} {t * 1e3:.1f} ms" for k, t in out[execution].items()))
    return out


# -- the report -----------------------------------------------------------------------------------


def _verdict(passed: bool) -> str:
    return "[green]ok[/green]" if passed else "[red]missed[/red]"


def _s(seconds: float) -> str:
    return f"{seconds:,.0f} s"


def targets(row: Row, pollux: list[Row], virtualflow: list[Row], workloads: list[Path]) -> list[tuple[str, bool]]:
    """(target text, met) for this row."""
    def find(rows: list[Row], policy: str, resize: str) -> Row:
        return next(r for r in rows if r.run.policy == policy and r.run.resize.name == resize)

    out = []
    avg = row.avg_jct_s
    if row.trace == "pollux":
        if row.run.policy == "tiresias":
            published = published_mean(workloads, "tiresias")
            out.append((f"published {_s(published)} +-{FIDELITY_TOLERANCE:.0%} (ours {avg / published - 1:+.1%})",
                        abs(avg / published - 1) <= FIDELITY_TOLERANCE))
        if row.run.policy == "vnodes":
            tiresias = find(pollux, "tiresias", "flat 30 s").avg_jct_s
            wfs = find(pollux, "wfs", "flat 30 s").avg_jct_s
            stretch = published_mean(workloads, "pollux")
            out.append((f"<= {TARGET_VS_TIRESIAS}x tiresias = {_s(TARGET_VS_TIRESIAS * tiresias)} "
                        f"(ours {avg / tiresias:.2f}x)", avg <= TARGET_VS_TIRESIAS * tiresias))
            out.append((f"< wfs {_s(wfs)}", avg < wfs))
            out.append((f"stretch: <= Pollux {_s(stretch)}", avg <= stretch))
    else:
        if row.run.policy in VIRTUALFLOW_LOGGED_S:
            logged = VIRTUALFLOW_LOGGED_S[row.run.policy]
            out.append((f"logged {_s(logged)} +-{FIDELITY_TOLERANCE:.0%} (ours {avg / logged - 1:+.1%})",
                        abs(avg / logged - 1) <= FIDELITY_TOLERANCE))
        if row.run.policy == "vnodes":
            wfs = find(virtualflow, "wfs", "virtualflow").avg_jct_s
            out.append((f"< wfs {_s(wfs)}", avg < wfs))
    return out


def print_report(console, pollux: list[Row], virtualflow: list[Row], workloads: list[Path],
                 check: Optional[dict[str, dict[int, float]]], check_steps: tuple[int, int]) -> bool:
    from rich.table import Table

    ok = True
    console.print(header("numpy", "scipy", "torch"), highlight=False)
    names = ", ".join(p.stem for p in workloads)
    table = Table(title=f"Cluster scheduling, simulated. pollux: {names} ({160 * len(workloads):,} jobs), 64 GPUs "
                  "(16 x 4), a decision every 60 s; avg JCT = mean of the per-workload averages, p99 over all jobs "
                  "pooled, makespan and utilization = means. medium20_12jph: 20 jobs, 8 GPUs, decisions every 60 s "
                  "and at every arrival and completion.", title_justify="left")
    for name, justify in (("trace", "left"), ("policy", "left"), ("resize model", "left"), ("avg JCT", "right"),
                          ("p99 JCT", "right"), ("makespan", "right"), ("utilization", "right"),
                          ("resizes / job", "right"), ("preemptions / job", "right"), ("target", "left"),
                          ("", "left")):
        table.add_column(name, justify=justify)
    for rows in (pollux, virtualflow):
        for row in rows:
            met = targets(row, pollux, virtualflow, workloads)
            ok &= all(passed for _, passed in met)
            table.add_row(row.trace, row.run.policy, row.run.resize.name, _s(row.avg_jct_s),
                          _s(float(np.percentile(row.pooled, 99))), _s(row.mean("makespan_s")),
                          f"{row.mean('utilization'):.1%}", f"{row.per_job('resizes'):.2f}",
                          f"{row.per_job('preemptions'):.2f}", "\n".join(text for text, _ in met) or "-",
                          "\n".join(_verdict(passed) for _, passed in met))
        if rows is pollux:
            table.add_section()
    console.print(table)

    if check is None:
        return ok
    rounds, steps = check_steps
    console.print(f"Model check: StepEngine, one worker holding k of {MODEL_CHECK_VNODES} virtual nodes (ResNet, "
                  f"3 blocks, 16 samples of 3x32x32 each), compute + apply, CPU, 1 thread; median of {rounds} rounds "
                  f"x {steps} steps. The simulator assumes time(k) = k x time(1): ratio 1.", highlight=False)
    table = Table()
    for name in ("k", "sequential", "k x time(1)", "ratio", "fused", "k x time(1)", "ratio"):
        table.add_column(name, justify="right")
    seq, fused = check["sequential"], check["fused"]
    for k in MODEL_CHECK_K:
        table.add_row(str(k), f"{seq[k] * 1e3:.1f} ms", f"{k * seq[1] * 1e3:.1f} ms", f"{seq[k] / (k * seq[1]):.3f}",
                      f"{fused[k] * 1e3:.1f} ms", f"{k * fused[1] * 1e3:.1f} ms", f"{fused[k] / (k * fused[1]):.3f}")
    console.print(table)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Pollux workload-6 only, a short model check")
    parser.add_argument("--rounds", type=int, help="model check: interleaved rounds (default 7; smoke 2)")
    parser.add_argument("--steps", type=int, help="model check: steps per k per round (default 3; smoke 1)")
    parser.add_argument("--skip-model-check", action="store_true", help="leave out the model check")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)

    def progress(line: str) -> None:
        console.print(line, style="dim", highlight=False)

    workloads = [pollux_workloads()[5]] if args.smoke else pollux_workloads()
    rounds = args.rounds or (2 if args.smoke else 7)
    steps = args.steps or (1 if args.smoke else 3)
    t0 = time.perf_counter()
    progress("simulating...")
    pollux, virtualflow = run_simulations(workloads, progress)
    check = None if args.skip_model_check else model_check(rounds, steps, progress)
    progress(f"measured in {time.perf_counter() - t0:.0f} s")
    ok = print_report(console, pollux, virtualflow, workloads, check, (rounds, steps))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
