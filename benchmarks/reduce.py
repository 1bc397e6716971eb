"""The cross-worker gradient reduction: deterministic (canonical tree) against fast (all-reduce).

    python benchmarks/reduce.py            # about 2 minutes on 2 CPU cores
    python benchmarks/reduce.py --quick    # a smaller payload, fewer repetitions

W worker processes form a real gloo group through ``EpochGroup`` (loopback: a real master in
this process serves the rendezvous on its gRPC channel; each worker registers with it). Each holds the gradients of its share of N = 16 virtual nodes (ResNet-18's parameter
shapes, 11.2M float32 values per node, random) and reduces them three ways, interleaved, after one
warm-up round:

- **fast**: ``EpochGroup.reduce(deterministic=False)``: the worker's summed gradient, one all-reduce;
- **gather all** (anchor, the deterministic path before the reduce-scatter): every worker's
  canonical-tree blocks, serialized, gathered to every worker, which then sums all of them;
- **reduce-scatter**: ``EpochGroup.reduce(deterministic=True)``: worker r sums slice r of every
  block in the canonical order, then the summed slices are gathered.

Both deterministic paths must give the same bits (checked every round). With an even, aligned
mapping each worker holds one block; with 3 workers the node ranges are not aligned, so workers
hold several blocks (the worst case for gathering everything to everyone). Times are rank 0's wall
time from a barrier to the result; the table gives medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loopback import join, start_master  # noqa: E402
from models import resnet18  # noqa: E402
from vnodes.runtime.collectives import EpochGroup  # noqa: E402
from vnodes.runtime.engine import StepPartial  # noqa: E402
from vnodes.runtime.reduction import Block, TreeReducer, canonical_sum  # noqa: E402

VNODES = 16


def gather_all(group: EpochGroup, partial: StepPartial):
    """The anchor: the deterministic reduction as it was, every block gathered to every worker."""
    local = ([(b.start, b.size, [t.cpu() for t in b.payload]) for b in partial.blocks], partial.used)
    gathered = group.all_gather_objects(local)
    blocks = [Block(start, size, payload) for worker_blocks, _ in gathered for start, size, payload in worker_blocks]
    used = [any(flags) for flags in zip(*(u for _, u in gathered))]
    return canonical_sum(blocks), used


def node_ranges(world: int) -> list[range]:
    """Contiguous, near-even shares of the virtual nodes (what the even placement gives)."""
    bounds = [round(r * VNODES / world) for r in range(world + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


def _rank_main(index: int, world: int, address: str, shapes: list[torch.Size], rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    client, plan = join(address)
    rank = plan.rank_of(client.worker_id)  # the master's choice: it decides which nodes this rank holds
    reducer = TreeReducer()
    for v in node_ranges(world)[rank]:
        g = torch.Generator().manual_seed(v)
        reducer.push(Block(v, 1, [torch.randn(s, generator=g) for s in shapes]))
    blocks = reducer.blocks()
    used = [True] * len(shapes)
    summed = [t.clone() for t in blocks[0].payload]
    for b in blocks[1:]:
        torch._foreach_add_(summed, b.payload)
    group = EpochGroup(client, torch.device("cpu"), timeout_s=300)
    group.form(plan.membership_epoch, rank, world)

    ways = {
        "fast": lambda: group.reduce(StepPartial(0, [t.clone() for t in summed], [], {}, used), False),
        "gather all": lambda: gather_all(group, StepPartial(0, None, blocks, {}, used)),
        "reduce-scatter": lambda: group.reduce(StepPartial(0, None, blocks, {}, used), True),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    equal = True
    for i in range(rounds + 1):
        names = list(ways) if i % 2 == 0 else list(reversed(ways))
        results = {}
        for name in names:
            group.all_gather_objects(None)  # barrier
            t0 = time.perf_counter()
            results[name] = ways[name]()
            if i > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
        equal &= all(torch.equal(a, b) for a, b in zip(results["gather all"][0], results["reduce-scatter"][0]))
    equal = all(group.all_gather_objects(equal))  # every rank's bits, and everyone leaves together
    if rank == 0:
        torch.save({"times": times, "blocks": [(b.start, b.size) for b in blocks], "equal": equal}, out)


def measure(world: int, shapes: list[torch.Size], rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        server, address = start_master(world)
        try:
            mp.start_processes(_rank_main, args=(world, address, shapes, rounds, out), nprocs=world,
                               join=True, start_method="spawn")
        finally:
            server.stop(0)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at width 16, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 7)")
    args = parser.parse_args()
    width, rounds = (16, 3) if args.quick else (64, 7)
    rounds = args.rounds or rounds
    shapes = [p.shape for p in resnet18(width=width).parameters()]
    values = sum(s.numel() for s in shapes)
    print(f"payload per node: {values / 1e6:.1f}M float32 values ({values * 4 / 2**20:.0f} MiB), "
          f"{VNODES} virtual nodes, {rounds} timed rounds per row, {os.cpu_count()} CPU cores\n")
    print("| workers | blocks of rank 0 | fast all-reduce | gather all (anchor) | reduce-scatter "
          "| gather all / reduce-scatter | reduce-scatter / fast | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    for world in (2, 3, 4):
        r = measure(world, shapes, rounds)
        med = {name: statistics.median(ts) for name, ts in r["times"].items()}
        print(f"| {world} | {len(r['blocks'])} | {med['fast'] * 1e3:.0f} ms | {med['gather all'] * 1e3:.0f} ms "
              f"| {med['reduce-scatter'] * 1e3:.0f} ms | {med['gather all'] / med['reduce-scatter']:.2f}x "
              f"| {med['reduce-scatter'] / med['fast']:.2f}x | {r['equal']} |", flush=True)


if __name__ == "__main__":
    main()
