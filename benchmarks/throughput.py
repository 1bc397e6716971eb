"""Step throughput: the virtual-node engine against a hand-written gradient-accumulation loop.

    python benchmarks/throughput.py            # about 3 minutes on 2 CPU cores
    python benchmarks/throughput.py --quick    # about 30 s
    python benchmarks/throughput.py --profile  # also: where the engine spends its time (cProfile)

Both sides train the same ResNet-style CNN with BatchNorm (3x32x32 inputs, synthetic data in an
in-memory ``TensorDataset``) with the same SGD, N micro-batches of b per optimizer step, on one CPU
worker with the same fixed thread count:

- engine: ``StepEngine`` in fast mode, sequential execution, driven step by step
  (``compute`` then ``apply``), so building the model and the dataset is not timed;
- ``train()``: the whole of ``train(spec, workers=1)``, what a user runs: the in-process master,
  the direct transport, the worker agent and the engine (``scheduler/direct.py``). It runs in a
  thread that a callback holds at the end of each step, so that the steps can be timed one run at a
  time, interleaved with the others; the hand-off (a semaphore each way) counts against it;
- hand loop: ``for each micro-batch: forward, loss.mean() / N, backward``; then ``optimizer.step()``
  and ``zero_grad()``.

What is matched, so that the ratio measures only the engine's own overhead: the initial weights
(same seed), the samples (the hand loop reads the indices ``VNodeSampler`` gives virtual node v at
step s, which is what the engine reads), how a batch is loaded (``default_collate([ds[i] for i in
idx])``, in this process: ``loader_workers=0``), the per-sample loss, and ``zero_grad(set_to_none=
True)``. What is *not* matched is exactly the engine's extra work: per-virtual-node seeding of the data
and model random streams, the snapshot / restore / weighted sum of BatchNorm running statistics, the
loss bookkeeping and the one host sync per step. Before timing, one step of each from the same
weights is compared (same math: the parameters must agree).

Timing runs in one process, interleaved in many short pairs (engine, hand, hand, engine, engine,
hand, ...: the order alternates so that a slow trend hits both sides alike), after warm-up. The
machine may be shared, so the tables report medians, the median of the per-pair ratios (each pair
measured back to back), and the same ratio in CPU time (``time.process_time``, all of this process's
threads): wall-clock time is what a user gets, CPU time is what survives a busy neighbour (time spent
descheduled does not count; OpenMP threads spinning at a barrier do, on both sides alike).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import gc
import io
import pstats
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.data._utils.collate import default_collate

from models import BasicBlock
from vnodes.runtime import Callback, JobSpec, StepEngine, VNodeSampler, train

TARGET_RATIO = 0.97  # engine samples/s >= 0.97 x the hand loop's


# -- the workload --------------------------------------------------------------------------------

def build_model(width: int = 16) -> nn.Module:
    """A small ResNet (3 blocks, 10 BatchNorm layers, ~78k parameters at width 16). No dropout: the
    hand loop draws no random numbers, so the two sides compute the same thing."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


def build_dataset(n: int = 4096, seed: int = 1234) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1).float() * 0.1
    return TensorDataset(x, y)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def build_tiny_model(width: int = 16) -> nn.Module:
    """Next to no compute, one BatchNorm layer: what is left of a step is the loops' own cost."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, 10))


MODELS = {"resnet": build_model, "tiny": build_tiny_model}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    virtual_nodes: int
    vnode_batch_size: int
    model: str = "resnet"


CONFIGS = (
    Config("8 x 16", 8, 16),
    Config("32 x 4", 32, 4),  # small micro-batches: the engine's per-node cost weighs more
)
# The engine's own cost per virtual node, measured where the model costs next to nothing.
FLOOR = Config("64 x 4, tiny model", 64, 4, model="tiny")


def make_spec(cfg: Config, threads: int, width: int) -> JobSpec:
    return JobSpec(
        model=functools.partial(MODELS[cfg.model], width),
        dataset=build_dataset,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        loss=per_sample_loss,
        virtual_nodes=cfg.virtual_nodes,
        vnode_batch_size=cfg.vnode_batch_size,
        seed=0,
        deterministic=False,
        device="cpu",
        num_threads=threads,
    )


# -- the two contestants -----------------------------------------------------------------------

class EngineRunner:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.engine = StepEngine.build(spec)
        self.step = 0

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    def run_step(self) -> None:
        n, engine = self.spec.virtual_nodes, self.engine
        partial = engine.compute(self.step, engine.loader.iterate((self.step, v) for v in range(n)))
        engine.apply(partial.payload, partial.used)  # one worker: its partial is the total
        self.step += 1


class TrainRunner:
    """``train(spec, workers=1)`` in a thread, held after each step until ``run_step`` lets it go on."""

    def __init__(self, spec: JobSpec, total_steps: int):
        self.go, self.stepped = threading.Semaphore(0), threading.Semaphore(0)
        runner = self

        class Gate(Callback):
            def on_step_end(self, state):
                runner.stepped.release()
                runner.go.acquire()

        self.thread = threading.Thread(target=train, args=(spec, total_steps), daemon=True,
                                       kwargs={"callbacks": [Gate()], "progress": False})
        self.thread.start()
        self.stepped.acquire()  # step 0 (building the job included) is not timed

    def run_step(self) -> None:
        self.go.release()
        self.stepped.acquire()

    def finish(self) -> None:
        """Let the run go to its end (its remaining steps and its final checkpoint)."""
        while self.thread.is_alive():
            self.go.release()
            self.thread.join(timeout=0.05)


class HandLoop:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.dataset = spec.dataset()
        # The engine's indices, so both sides read the same samples (a DistributedSampler per rank,
        # built once per epoch: the same cost the engine pays).
        self.sampler = VNodeSampler(len(self.dataset), spec.virtual_nodes, spec.vnode_batch_size, spec.seed)
        torch.manual_seed(spec.seed)  # the engine's initial weights
        self.model = spec.model().train()
        self.optimizer = spec.optimizer(self.model.parameters())
        self.step = 0

    def run_step(self) -> None:
        n = self.spec.virtual_nodes
        for v in range(n):
            idx = self.sampler.indices(self.step, v)
            x, y = default_collate([self.dataset[i] for i in idx])
            loss = per_sample_loss(self.model(x), y).mean() / n
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1


def check_same_math(spec: JobSpec) -> float:
    """One step of each from the same weights; the largest parameter difference after it."""
    engine, hand = EngineRunner(spec), HandLoop(spec)
    engine.run_step()
    hand.run_step()
    return max((a - b).abs().max().item()
               for a, b in zip(engine.model.parameters(), hand.model.parameters()))


@dataclasses.dataclass
class Timing:
    wall_s: float  # per step
    cpu_s: float  # per step, all threads of this process


def timed(runner, steps: int) -> Timing:
    """Wall-clock and CPU seconds per step over ``steps`` consecutive steps."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        runner.run_step()
    return Timing((time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps)


@dataclasses.dataclass
class Measurement:
    config: Config
    engine: list[Timing]
    hand: list[Timing]
    max_param_diff: float
    train: list[Timing] = dataclasses.field(default_factory=list)

    def samples_per_s(self, side: list[Timing]) -> float:
        batch = self.config.virtual_nodes * self.config.vnode_batch_size
        return batch / statistics.median(t.wall_s for t in side)

    def ratios(self, clock: str, side: str = "engine") -> list[float]:
        """``side``'s throughput (engine or train) over the hand loop's, per back-to-back run."""
        return [getattr(h, clock) / getattr(e, clock) for e, h in zip(getattr(self, side), self.hand)]

    def ratio(self, clock: str, side: str = "engine") -> float:
        return statistics.median(self.ratios(clock, side))

    def per_vnode_s(self, side: list[Timing], clock: str) -> float:
        return statistics.median(getattr(t, clock) for t in side) / self.config.virtual_nodes

    def extra_per_vnode_s(self, clock: str) -> float:
        """The engine's extra time per virtual node: median over pairs of the step-time difference."""
        diffs = [getattr(e, clock) - getattr(h, clock) for e, h in zip(self.engine, self.hand)]
        return statistics.median(diffs) / self.config.virtual_nodes


def measure(cfg: Config, threads: int, width: int, repeats: int, steps: int, warmup: int,
            console: Console) -> Measurement:
    spec = make_spec(cfg, threads, width)
    diff = check_same_math(spec)
    engine, hand = EngineRunner(spec), HandLoop(spec)
    whole = TrainRunner(spec, 1 + warmup + repeats * steps)
    timed(engine, warmup)
    timed(hand, warmup)
    timed(whole, warmup)
    m = Measurement(cfg, [], [], diff)
    sides = [(engine, m.engine), (hand, m.hand), (whole, m.train)]
    for r in range(repeats):
        for runner, out in (sides if r % 2 == 0 else sides[::-1]):
            out.append(timed(runner, steps))
        if (r + 1) % 5 == 0 or r + 1 == repeats:
            console.print(f"  {cfg.name}: {r + 1}/{repeats} pairs; median step engine "
                          f"{statistics.median(t.wall_s for t in m.engine) * 1e3:.1f} ms, hand "
                          f"{statistics.median(t.wall_s for t in m.hand) * 1e3:.1f} ms, train() "
                          f"{statistics.median(t.wall_s for t in m.train) * 1e3:.1f} ms",
                          style="dim", highlight=False)
    whole.finish()
    return m


def profile_engine(cfg: Config, threads: int, width: int, steps: int, console: Console) -> None:
    """cProfile of the engine's steps: the Python-side functions, by own time and cumulative time."""
    spec = make_spec(cfg, threads, width)
    engine = EngineRunner(spec)
    timed(engine, 2)
    gc.collect()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.run_step()
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(25)
        console.print(f"[bold]engine profile, {cfg.name}, {steps} steps, by {order}[/bold]")
        print(out.getvalue(), flush=True)  # plain: rich would wrap the long lines


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def report(results: list[Measurement], floor: Measurement, threads: int, width: int,
           console: Console) -> bool:
    pairs = len(results[0].engine)
    table = Table(title=f"Step throughput: CPU, {threads} thread(s), one worker, fast mode, sequential; "
                  f"ResNet width {width}; median of {pairs} back-to-back pairs")
    table.add_column("N x b")
    table.add_column("engine\nsamples/s", justify="right")
    table.add_column("hand loop\nsamples/s", justify="right")
    table.add_column("engine/hand\nwall", justify="right")
    table.add_column("wall pairs\np25-p75", justify="right")
    table.add_column("engine/hand\nCPU time", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    table.add_column("extra wall\nper VN", justify="right")
    table.add_column("same math\nmax |dparam|", justify="right")
    table.add_column("train()/hand\nwall", justify="right")
    table.add_column("", justify="center")
    ok = True
    for m in results:
        wall, cpu = m.ratio("wall_s"), m.ratio("cpu_s")
        whole = m.ratio("wall_s", "train")
        passed, whole_passed = wall >= TARGET_RATIO, whole >= TARGET_RATIO
        ok &= passed and whole_passed
        q = statistics.quantiles(m.ratios("wall_s"), n=4) if pairs > 1 else [wall] * 3
        table.add_row(
            m.config.name,
            f"{m.samples_per_s(m.engine):,.0f}",
            f"{m.samples_per_s(m.hand):,.0f}",
            f"{wall:.3f}x",
            f"{q[0]:.3f}-{q[2]:.3f}",
            f"{cpu:.3f}x",
            f">= {TARGET_RATIO:.2f}x",
            "[green]ok[/green]" if passed else "[red]below[/red]",
            _us(m.extra_per_vnode_s("wall_s")),
            f"{m.max_param_diff:.1e}",
            f"{whole:.3f}x",
            "[green]ok[/green]" if whole_passed else "[red]below[/red]",
        )
    console.print(table)

    floor_table = Table(title=f"Time per virtual node where the model costs next to nothing "
                        f"({floor.config.name}; median of {len(floor.engine)} pairs)")
    floor_table.add_column("clock")
    floor_table.add_column("engine", justify="right")
    floor_table.add_column("hand loop", justify="right")
    floor_table.add_column("engine extra", justify="right")
    floor_table.add_column("train()", justify="right")
    for clock, label in (("wall_s", "wall"), ("cpu_s", "CPU (all threads)")):
        floor_table.add_row(label, _us(floor.per_vnode_s(floor.engine, clock)),
                            _us(floor.per_vnode_s(floor.hand, clock)), _us(floor.extra_per_vnode_s(clock)),
                            _us(floor.per_vnode_s(floor.train, clock)))
    console.print(floor_table)
    console.print(f"same math (tiny model): max |dparam| {floor.max_param_diff:.1e}", highlight=False)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (~30 s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both sides (default: torch's, %(default)s here)")
    parser.add_argument("--width", type=int, default=16, help="ResNet width (default %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed pairs per configuration (default 25, quick 7)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed run (default %(default)s)")
    parser.add_argument("--profile", action="store_true", help="also profile the engine with cProfile")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a ratio is below the target (noisy on a shared machine)")
    args = parser.parse_args(argv)

    repeats = args.repeats or (7 if args.quick else 25)
    warmup = 2 if args.quick else 4
    torch.set_num_threads(args.threads)  # both sides; the spec carries the same number
    console = Console(width=None if sys.stdout.isatty() else 130)

    results = [measure(cfg, args.threads, args.width, repeats, args.steps, warmup, console) for cfg in CONFIGS]
    floor = measure(FLOOR, args.threads, args.width, repeats, args.steps, warmup, console)
    ok = report(results, floor, args.threads, args.width, console)
    if args.profile:
        for cfg in (*CONFIGS, FLOOR):
            profile_engine(cfg, args.threads, args.width, 4 * args.steps, console)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
