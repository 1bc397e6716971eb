"""Control-plane throughput: the master with many simulated workers over the real gRPC protocol.

Each simulated worker is a thread with its own channel that registers, streams heartbeats, and
loops GetPlan -> Commit exactly as a real worker does, without any torch work. The master runs in a
separate process (as in a real job). Reported: committed steps per second in steady state, beside
the RPC rate it implies, for several worker counts; target >= 20 steps/s at 256 workers.

    python benchmarks/control_plane.py [--workers 256] [--steps 60]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time


def serve_master(n_workers: int, steps: int, port_box, done_box, switch_s: float) -> None:
    import sys

    sys.setswitchinterval(switch_s)
    from vnodes.scheduler.master import Master
    from vnodes.scheduler.servicer import MasterServicer, serve

    master = Master(n_workers, steps, expected_workers=n_workers, start_grace_s=120, heartbeat_timeout_s=60)
    server, port = serve(MasterServicer(master, b"", "127.0.0.1", 1, "/tmp", 0))
    port_box.value = port
    master.wait(lambda m: m.step >= steps, timeout_s=600)
    times = [c.committed_at_s for c in master.committed]
    done_box.put((times, time.process_time()))
    server.stop(1)


def simulated_worker(address: str, barrier: threading.Barrier, stop: threading.Event) -> None:
    import grpc

    from vnodes.protos import vnodes_pb2 as pb
    from vnodes.protos import vnodes_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.MasterStub(channel)
    wid = stub.Register(pb.RegisterRequest(worker=pb.WorkerDescription(host="sim", pid=1)), timeout=60).worker_id

    def beats():
        while not stop.wait(1.0):
            yield pb.Heartbeat(worker_id=wid)

    session = stub.Session.future(beats())
    barrier.wait()
    held, plan = 0, None
    try:
        while True:
            if plan is None:
                plan = stub.GetPlan(pb.PlanRequest(worker_id=wid, held_step=held, checkpoint_step=-1), timeout=120)
            if plan.kind == pb.Plan.STOP:
                break
            if plan.kind != pb.Plan.RUN:
                plan = None
                continue
            reply = stub.Commit(pb.CommitRequest(worker_id=wid, membership_epoch=plan.membership_epoch,
                                                 step=plan.step, ok=True, loss=1.0, step_time_s=0.01), timeout=120)
            if reply.decision == pb.CommitReply.COMMIT:
                held = plan.step + 1
            plan = reply.next if reply.HasField("next") else None  # the next plan rides on the commit
    except grpc.RpcError:
        pass
    finally:
        session.cancel()
        channel.close()


def measure(n_workers: int, steps: int, switch_s: float = 0.005) -> dict:
    ctx = mp.get_context("spawn")
    port_box, done_box = ctx.Value("i", 0), ctx.Queue()
    server = ctx.Process(target=serve_master, args=(n_workers, steps, port_box, done_box, switch_s), daemon=True)
    server.start()
    while port_box.value == 0:
        time.sleep(0.05)
    address = f"127.0.0.1:{port_box.value}"
    barrier, stop = threading.Barrier(n_workers), threading.Event()
    threads = [threading.Thread(target=simulated_worker, args=(address, barrier, stop), daemon=True)
               for _ in range(n_workers)]
    for t in threads:
        t.start()
    t_client = time.process_time()
    times, server_cpu_s = done_box.get(timeout=900)
    client_cpu_s = time.process_time() - t_client
    stop.set()
    for t in threads:
        t.join(timeout=30)
    server.join(timeout=30)
    warm = times[len(times) // 5:]  # steady state: skip the first fifth
    gaps = [b - a for a, b in zip(warm, warm[1:])]
    rate = (len(warm) - 1) / (warm[-1] - warm[0])
    wall = times[-1] - times[0]
    return {"workers": n_workers, "steps_per_s": rate, "median_step_ms": 1000 * statistics.median(gaps),
            "server_cpu": server_cpu_s / wall, "client_cpu": client_cpu_s / wall,
            "rpcs_per_s": rate * n_workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--switch-interval", type=float, default=0.005,
                        help="sys.setswitchinterval in both processes (Python's default: 0.005)")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)
    rows = [measure(n, args.steps, args.switch_interval) for n in args.workers]
    print("\n| simulated workers | committed steps/s | median step (ms) | RPCs/s | master CPU | workers' CPU | target |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        target = ">= 20 steps/s" if r["workers"] == 256 else ""
        print(f"| {r['workers']} | {r['steps_per_s']:.1f} | {r['median_step_ms']:.1f} | {r['rpcs_per_s']:,.0f} | "
              f"{r['server_cpu']:.0%} | {r['client_cpu']:.0%} | {target} |")


if __name__ == "__main__":
    main()
