"""Peak memory of one worker hosting 64 virtual nodes against one hosting 1 (DESIGN.md contract 6).

    python benchmarks/memory.py            # about 1 minute on 2 CPU cores
    python benchmarks/memory.py --quick    # 16 virtual nodes instead of 64, fewer steps

Each configuration trains in a fresh process (``python benchmarks/memory.py --child ...``), so no
peak carries over from another. A child runs ``train()`` and reports, through a callback:

- baseline: the resident set size at ``on_fit_start``: the engine is built (dataset, model,
  optimizer), nothing has trained yet;
- peak: ``ru_maxrss`` at the last ``on_step_end``: the high-water mark of the whole process up to the
  last applied step (before ``train()`` copies the final weights out for its result).

The model is an MLP of ~23M parameters (one BatchNorm layer, so the per-VN running statistics are
exercised too) trained with Adam: weights, gradients and Adam's two moments (~4 x 92 MB) dominate,
and a micro-batch of 4 keeps activations small. ``peak - baseline`` is what training adds: gradients,
optimizer state, activations and the engine's own buffers.

Fast mode accumulates every virtual node's gradient into one buffer, so 64 virtual nodes should cost
what 1 does (target: <= 1.1x). Deterministic mode keeps each node's gradient apart and sums them in a
fixed tree over ``vnode_id``: up to ``log2(N) + 1`` gradient-sized partial sums are alive at once, by
design; the table says how much that is expected to cost and what it did cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

TARGET_RATIO = 1.1  # fast mode: peak(64 VNs) <= 1.1 x peak(1 VN)
MB = 1024 * 1024


# -- the job (module level: importable by the child) ---------------------------------------------

IN_FEATURES, HIDDEN, CLASSES = 512, 4096, 10


def build_model():
    from torch import nn

    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, 1024), nn.ReLU(),
        nn.Linear(1024, CLASSES),
    )


def build_dataset(n: int = 2048, seed: int = 1234):
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, IN_FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def per_sample_loss(outputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, targets, reduction="none")


def make_spec(virtual_nodes: int, vnode_batch_size: int, deterministic: bool, threads: int):
    import torch

    from vnodes.runtime import JobSpec

    return JobSpec(
        model=build_model,
        dataset=build_dataset,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
        loss=per_sample_loss,
        virtual_nodes=virtual_nodes,
        vnode_batch_size=vnode_batch_size,
        seed=0,
        deterministic=deterministic,
        device="cpu",
        num_threads=threads,
    )


# -- the child: one configuration, one process -----------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def child(args: argparse.Namespace) -> None:
    import torch

    from vnodes.runtime import Callback, train

    class Probe(Callback):
        baseline_bytes = peak_bytes = 0

        def on_fit_start(self, state) -> None:
            self.baseline_bytes = _rss_bytes()

        def on_step_end(self, state) -> None:
            self.peak_bytes = _maxrss_bytes()

    spec = make_spec(args.vnodes, args.batch, args.deterministic, args.threads)
    probe = Probe()
    t0 = time.perf_counter()
    train(spec, steps=args.steps, callbacks=[probe], progress=False)
    model = build_model()
    print(json.dumps({
        "baseline_bytes": probe.baseline_bytes,
        "peak_bytes": probe.peak_bytes,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "largest_param_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
        "params": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }))


# -- the parent: run the children, print the table -------------------------------------------------

@dataclasses.dataclass
class Row:
    mode: str
    vnodes: int
    baseline_bytes: int
    peak_bytes: int
    param_bytes: int
    largest_param_bytes: int
    params: int

    @property
    def added_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def run_child(vnodes: int, batch: int, deterministic: bool, steps: int, threads: int) -> Row:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--vnodes", str(vnodes), "--batch", str(batch),
           "--steps", str(steps), "--threads", str(threads)] + (["--deterministic"] if deterministic else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Row("deterministic" if deterministic else "fast", vnodes, data["baseline_bytes"], data["peak_bytes"],
               data["param_bytes"], data["largest_param_bytes"], data["params"])


def report(rows: dict[tuple[str, int], Row], n: int) -> bool:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 130)
    any_row = next(iter(rows.values()))
    grad_mb = any_row.param_bytes / MB
    table = Table(title=f"Peak RSS of one CPU worker, {n} VNs vs 1 VN (MLP, {any_row.params / 1e6:.1f}M params "
                  f"= {grad_mb:.0f} MB per copy, Adam, fresh process per row)")
    for name in ("mode", "VNs", "baseline\n(built)", "peak", "peak -\nbaseline",
                 f"{n}/1 peak", f"{n}/1 peak -\nbaseline", "target", "", "expected extra\nby design"):
        table.add_column(name, justify="left" if name in ("mode", "") else "right")
    ok = True
    for mode in ("fast", "deterministic"):
        one, many = rows[(mode, 1)], rows[(mode, n)]
        ratio = many.peak_bytes / one.peak_bytes
        added_ratio = many.added_bytes / one.added_bytes
        if mode == "fast":
            passed = ratio <= TARGET_RATIO
            ok &= passed
            # From the second node on, autograd computes each parameter's gradient into a fresh
            # tensor and adds it to .grad: one such tensor is alive at a time (a hand-written
            # accumulation loop pays the same).
            target, verdict = f"<= {TARGET_RATIO}x", "[green]ok[/green]" if passed else "[red]above[/red]"
            expected = f"<= 1 fresh grad of the\nlargest param = {any_row.largest_param_bytes / MB:,.0f} MB"
        else:
            # Up to log2(N) + 1 gradient-sized partial sums alive, against 1 for a single node.
            extra = int(math.log2(n)) + 1 - 1
            target, verdict, expected = "-", "", f"<= {extra} x {grad_mb:.0f} MB = {extra * grad_mb:,.0f} MB"
        for row in (one, many):
            last = row is many
            table.add_row(
                mode if not last else "", str(row.vnodes), f"{row.baseline_bytes / MB:,.0f} MB",
                f"{row.peak_bytes / MB:,.0f} MB", f"{row.added_bytes / MB:,.0f} MB",
                f"{ratio:.3f}x" if last else "", f"{added_ratio:.3f}x" if last else "",
                target if last else "", verdict if last else "",
                (expected + f"\n(measured {(many.peak_bytes - one.peak_bytes) / MB:,.0f} MB)") if last else "",
            )
        table.add_section()
    console.print(table)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 VNs instead of 64, 2 steps")
    parser.add_argument("--vnodes", type=int, help="virtual nodes of the large configuration (default 64, quick 16)")
    parser.add_argument("--batch", type=int, default=4, help="vnode_batch_size (default %(default)s)")
    parser.add_argument("--steps", type=int, help="steps per run (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default %(default)s)")
    parser.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="exit with status 1 when fast mode misses the target")
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    n = args.vnodes or (16 if args.quick else 64)
    steps = args.steps or (2 if args.quick else 3)
    rows = {}
    for mode in ("fast", "deterministic"):
        for vnodes in (1, n):
            t0 = time.perf_counter()
            row = run_child(vnodes, args.batch, mode == "deterministic", steps, args.threads)
            rows[(mode, vnodes)] = row
            print(f"  {mode}, {vnodes} VNs: peak {row.peak_bytes / MB:,.0f} MB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    ok = report(rows, n)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
