"""Control-plane throughput: the master with many simulated workers over the real gRPC protocol.

Each simulated worker has its own channel; it registers, opens its session stream, and loops
plan -> commit on the stream exactly as a real worker does, without any torch work. The master runs
in its own process (as in a real job); the simulated workers share one asyncio loop in another
process, so on a small machine the two compete for the same cores. Reported: committed steps per
second in steady state (the first fifth of the steps skipped), the stream messages per second that
implies, and the CPU each side used over the same window; target >= 20 steps/s at 256 workers.

    python benchmarks/control_plane.py [--workers 16 64 256] [--steps 100]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import struct
import time

import psutil


def serve_master(n_workers: int, steps: int, port_box, step_box, done_box, switch_s: float) -> None:
    import sys

    sys.setswitchinterval(switch_s)
    from vnodes.scheduler.master import Master
    from vnodes.scheduler.servicer import MasterServicer, serve

    master = Master(n_workers, steps, expected_workers=n_workers, start_grace_s=120, heartbeat_timeout_s=60)
    server, port = serve(MasterServicer(master, b"", "/tmp", 0))
    port_box.value = port
    master.wait(lambda m: m.step >= steps // 5, timeout_s=600)
    step_box.value = steps // 5
    cpu_start = time.process_time()
    master.wait(lambda m: m.step >= steps, timeout_s=600)
    cpu_s = time.process_time() - cpu_start
    times = [c.committed_at_s for c in master.committed]
    done_box.put((times, cpu_s))
    server.stop(1)


async def simulated_worker(address: str, ready: "asyncio.Event", registered: list, steps: int) -> None:
    """One worker's control traffic, as ``runtime/master_client.py`` sends it, without torch."""
    import grpc

    from vnodes.protos import PROTOCOL_VERSION
    from vnodes.protos import vnodes_pb2 as pb
    from vnodes.protos import vnodes_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MasterStub(channel)
        reg = await stub.Register(pb.RegisterRequest(worker=pb.WorkerDescription(host="sim", pid=1),
                                                      protocol_version=PROTOCOL_VERSION), timeout=60)
        wid, key = reg.worker_id, reg.session_key
        session = stub.Session()
        await session.write(pb.WorkerMessage(worker_id=wid, session_key=key, heartbeat=pb.Heartbeat()))
        registered.append(wid)
        await ready.wait()
        held, plan, vnodes = 0, None, []
        try:
            while True:
                if plan is None:
                    plan = await stub.GetPlan(pb.PlanRequest(worker_id=wid, session_key=key, held_step=held,
                                                             checkpoint_step=-1), timeout=120)
                if plan.kind == pb.Plan.STOP:
                    break
                if plan.kind != pb.Plan.RUN:
                    plan = None
                    continue
                if not plan.members_unchanged:
                    vnodes = next(list(m.vnodes) for m in plan.members if m.worker_id == wid)
                await session.write(pb.WorkerMessage(commit=pb.CommitRequest(
                    membership_epoch=plan.membership_epoch, step=plan.step, ok=True, loss=1.0, step_time_s=0.01,
                    vnodes=vnodes, vnode_losses=struct.pack(f"<{len(vnodes)}d", *[1.0] * len(vnodes)))))
                reply = (await session.read()).commit_reply
                if reply.decision == pb.CommitReply.COMMIT:
                    held = plan.step + 1
                plan = reply.next if reply.HasField("next") else None  # the next plan rides on the commit
            await session.done_writing()
        except grpc.aio.AioRpcError as exc:  # the master stops once its last step is measured
            if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE) or held < steps:
                raise


def run_workers(address: str, n_workers: int, steps: int, switch_s: float) -> None:
    """A process of simulated workers: one asyncio loop drives all their streams."""
    import asyncio

    sys.setswitchinterval(switch_s)

    async def main():
        ready, registered = asyncio.Event(), []
        tasks = [asyncio.ensure_future(simulated_worker(address, ready, registered, steps)) for _ in range(n_workers)]
        while len(registered) < n_workers:
            await asyncio.sleep(0.05)
        ready.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def _cpu_at_step(procs: list, step_box, step: int) -> float:
    """The simulated workers' CPU seconds once the master reports ``step`` committed."""
    while step_box.value < step:
        time.sleep(0.002)
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def measure(n_workers: int, steps: int, switch_s: float = 0.005, client_processes: int = 1) -> dict:
    ctx = mp.get_context("spawn")
    port_box, step_box, done_box = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Queue()
    server = ctx.Process(target=serve_master, args=(n_workers, steps, port_box, step_box, done_box, switch_s),
                         daemon=True)
    server.start()
    while port_box.value == 0:
        time.sleep(0.05)
    address = f"127.0.0.1:{port_box.value}"
    shares = [n_workers // client_processes + (i < n_workers % client_processes) for i in range(client_processes)]
    clients = [ctx.Process(target=run_workers, args=(address, share, steps, switch_s), daemon=True)
               for share in shares]
    for c in clients:
        c.start()
    procs = [psutil.Process(c.pid) for c in clients]
    client_cpu = _cpu_at_step(procs, step_box, steps // 5)
    times, server_cpu_s = done_box.get(timeout=900)
    client_cpu_s = sum(sum(p.cpu_times()[:2]) for p in procs) - client_cpu
    for c in clients:
        c.join(timeout=60)
    server.join(timeout=30)
    warm = times[steps // 5 - 1:]  # steady state: skip the first fifth
    gaps = [b - a for a, b in zip(warm, warm[1:])]
    wall = warm[-1] - warm[0]
    rate = (len(warm) - 1) / wall
    return {"workers": n_workers, "steps_per_s": rate, "median_step_ms": 1000 * statistics.median(gaps),
            "server_cpu": server_cpu_s / wall, "client_cpu": client_cpu_s / wall,
            "messages_per_s": 2 * rate * n_workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the simulated workers are spread over")
    parser.add_argument("--switch-interval", type=float, default=0.005,
                        help="sys.setswitchinterval in both processes (Python's default: 0.005)")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)
    rows = [measure(n, args.steps, args.switch_interval, args.client_processes) for n in args.workers]
    print("\n| simulated workers | committed steps/s | median step (ms) | stream messages/s | master CPU | "
          "workers' CPU | target |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        target = ">= 20 steps/s" if r["workers"] == 256 else ""
        print(f"| {r['workers']} | {r['steps_per_s']:.1f} | {r['median_step_ms']:.1f} | {r['messages_per_s']:,.0f} | "
              f"{r['server_cpu']:.0%} | {r['client_cpu']:.0%} | {target} |")


if __name__ == "__main__":
    main()
