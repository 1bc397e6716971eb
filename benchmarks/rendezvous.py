"""Forming a gloo group through the master's gRPC store against a torch TCPStore, side by side.

    python benchmarks/rendezvous.py               # W = 2, 4, 8; 7 timed repeats each; about 1 minute
    python benchmarks/rendezvous.py --repeats 15

For each W, W worker processes register with a real master on loopback (in this process, as
``vnodes master`` would serve it) and also connect to a ``TCPStore`` this process hosts (how the
master served the rendezvous before). Each repeat, every worker waits at a barrier, then builds a
``ProcessGroupGloo`` on a fresh key prefix of one store and checks it with an all-reduce; the two
stores alternate, after one warm-up round of each. A repeat's time is the slowest worker's (the
group exists once its last member has it); the table gives medians over the repeats. The last column
is the median round trip of one ``EpochStatus`` call (how a worker arrives at an epoch and polls
whether the master moved on) with all W workers calling at once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loopback import join, start_master  # noqa: E402
from vnodes.protos import epoch_store_prefix  # noqa: E402
from vnodes.runtime.master_store import MasterStore  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=120)


def _worker(index: int, world: int, address: str, tcp_port: int, repeats: int, barrier, out: str) -> None:
    torch.set_num_threads(1)
    client, plan = join(address)
    rank = plan.rank_of(client.worker_id)
    stores = {"grpc": MasterStore(client, TIMEOUT.total_seconds()),
              "tcp": dist.TCPStore("127.0.0.1", tcp_port, is_master=False, timeout=TIMEOUT)}
    times: dict[str, list[float]] = {name: [] for name in stores}
    for i in range(repeats + 1):  # round 0 warms up
        for name in (("grpc", "tcp") if i % 2 == 0 else ("tcp", "grpc")):
            # A fresh prefix per group, as each membership epoch has (far from the job's own epochs).
            store = dist.PrefixStore(epoch_store_prefix(10_000 + i) + name, stores[name])
            barrier.wait()
            t0 = time.perf_counter()
            group = dist.ProcessGroupGloo(store, rank, world, TIMEOUT)
            elapsed = time.perf_counter() - t0
            one = torch.ones(1)
            group.allreduce([one]).wait()
            if one.item() != world:
                raise RuntimeError(f"{name}: the group summed to {one.item()}, not {world}")
            if i > 0:
                times[name].append(elapsed)
            barrier.wait()  # every member is done with the group before any drops it
            del group
    barrier.wait()
    status = []
    for _ in range(20):
        t0 = time.perf_counter()
        client.epoch_status(plan.membership_epoch)
        status.append(time.perf_counter() - t0)
    torch.save({"times": times, "status": status}, os.path.join(out, f"{rank}.pt"))


def measure(world: int, repeats: int) -> dict:
    server, address = start_master(world)
    tcp = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    barrier = mp.get_context("spawn").Barrier(world)
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_worker, args=(world, address, tcp.port, repeats, barrier, out), nprocs=world,
                               join=True, start_method="spawn")
            results = [torch.load(os.path.join(out, f"{rank}.pt")) for rank in range(world)]
    finally:
        server.stop(0)
        del tcp
    slowest = {name: [max(r["times"][name][i] for r in results) for i in range(repeats)]
               for name in results[0]["times"]}
    return {"median": {name: statistics.median(ts) for name, ts in slowest.items()},
            "status": statistics.median(s for r in results for s in r["status"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per store and W (default 7)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8], help="group sizes (default 2 4 8)")
    args = parser.parse_args()
    print(f"gloo group formation, median of {args.repeats} repeats (slowest member each), "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")
    print("| W | gRPC store (master's channel) | TCPStore | gRPC / TCPStore | one EpochStatus call |")
    print("|---|---|---|---|---|")
    for world in args.worlds:
        r = measure(world, args.repeats)
        grpc_s, tcp_s = r["median"]["grpc"], r["median"]["tcp"]
        print(f"| {world} | {grpc_s * 1e3:.1f} ms | {tcp_s * 1e3:.1f} ms | {grpc_s / tcp_s:.2f}x "
              f"| {r['status'] * 1e3:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
