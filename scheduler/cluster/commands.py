"""The cluster service's commands (``vnodes cluster``, ``submit``, ``jobs``, ``cancel``).

    vnodes cluster [--port P] [--workers N] [--run-dir D] [--policy NAME] [--launcher local|ray]
    vnodes submit JOB.py[:NAME] --cluster HOST:PORT --steps K --priority P --run-dir D
                  [--deterministic] [--set FIELD=VALUE] [--workers W] [--checkpoint-every N]
    vnodes jobs --cluster HOST:PORT [--json]
    vnodes cancel ID [--cluster HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from vnodes.runtime.errors import VnodesError

from ..job_options import MAX_STEPS, int_in_range, parse_overrides
from .service_rpc import DEFAULT_PORT

log = logging.getLogger(__name__)

CLUSTER_ENV = "VNODES_CLUSTER"  # the default --cluster of submit, jobs and cancel
DEFAULT_CLUSTER = f"127.0.0.1:{DEFAULT_PORT}"


def _cluster_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", metavar="HOST:PORT", default=os.environ.get(CLUSTER_ENV, DEFAULT_CLUSTER),
                        help=f"the service's address (default: env {CLUSTER_ENV}, else {DEFAULT_CLUSTER})")
    parser.add_argument("--token", default=os.environ.get("VNODES_TOKEN"),
                        help="the service's --token, if it has one (env VNODES_TOKEN)")


def add_cluster_commands(commands) -> None:
    """Add the four commands to ``vnodes``' subparsers."""
    from .policies import POLICIES

    cluster = commands.add_parser(
        "cluster", help="serve a pool of workers that many jobs share (submit with `vnodes submit`)",
        description="Own a pool of workers (N local processes, or a Ray cluster's) and share it among submitted "
        "jobs by a scheduling policy, moving workers between jobs at step boundaries. A job's result does not "
        "depend on its worker count, so resizing changes nothing it computes. The state in --run-dir survives a "
        "restart: a service killed and started again on it picks up its jobs. Stopping the service leaves its "
        "local jobs running.",
    )
    cluster.add_argument("--port", type=int_in_range(0, 65535), default=DEFAULT_PORT,
                         help=f"gRPC port (default {DEFAULT_PORT}; 0 picks one)")
    cluster.add_argument("--host", default="127.0.0.1",
                         help="listen address of the service and of the jobs' masters (default 127.0.0.1; "
                         "beyond loopback --token is required)")
    cluster.add_argument("--token", default=os.environ.get("VNODES_TOKEN"),
                         help="token clients must present (env VNODES_TOKEN)")
    cluster.add_argument("--workers", type=int_in_range(1), metavar="N",
                         help="workers in the pool (local: default 1 per visible GPU, else the CPU count; "
                         "ray: default what the cluster holds, one per GPU or per --num-cpus CPUs)")
    cluster.add_argument("--run-dir", default="vnodes-cluster", metavar="D",
                         help="the service's state: its registry, the jobs' code and logs (default ./vnodes-cluster)")
    cluster.add_argument("--policy", default="vnodes", choices=list(POLICIES),
                         help="how workers are shared (default vnodes; see docs/guide/cluster.md)")
    cluster.add_argument("--launcher", choices=("local", "ray"), default="local",
                         help="local worker processes (default), or one Ray actor per worker")
    cluster.add_argument("--address", help="Ray cluster address for --launcher ray (default: start Ray locally)")
    cluster.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each Ray worker asks for (CPU nodes)")
    cluster.add_argument("--interval", type=float, default=1.0, metavar="S",
                         help="seconds between scheduling rounds (default 1; a submission or cancellation "
                         "starts one at once)")

    submit = commands.add_parser("submit", help="queue a job on a `vnodes cluster` service; prints its id",
                                 description="Check the job here (its file, --set values and spec), pack its folder "
                                 "and queue it on the service. Prints the job's id.")
    submit.add_argument("job", metavar="JOB.py[:NAME]",
                        help="a Python file defining a JobSpec (`spec`, the only one, NAME, or a function `job()`)")
    _cluster_option(submit)
    submit.add_argument("--steps", type=int_in_range(1, MAX_STEPS), required=True, help="global steps to train")
    submit.add_argument("--priority", type=int_in_range(1, 1000), default=1,
                        help="1-1000, higher first (priority, wfs: its weight; vnodes: divides its attained service)")
    submit.add_argument("--run-dir", "--checkpoint-dir", dest="run_dir", required=True, metavar="D",
                        help="the job's checkpoints and state, on the service's machine")
    submit.add_argument("--checkpoint-every", type=int_in_range(1), metavar="N",
                        help="also write a checkpoint every N steps (default: only at the end)")
    submit.add_argument("--deterministic", action="store_true", help="bitwise-reproducible mode")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a JobSpec field that is plain data (repeatable)")
    submit.add_argument("--workers", type=int_in_range(1), metavar="W",
                        help="the workers it asks for: what fifo, priority and tiresias give it, and what "
                        "wfs and vnodes start from (default: its virtual nodes, at most the pool)")
    submit.add_argument("--json", action="store_true", help='print {"id": ...} instead of the bare id')

    jobs = commands.add_parser("jobs", help="list a cluster service's jobs")
    _cluster_option(jobs)
    jobs.add_argument("--json", action="store_true",
                      help="print a JSON list: {id, name, state, priority, workers, step, steps, run_dir, message, "
                      "submitted_at, virtual_nodes, resizes} per job")

    cancel = commands.add_parser("cancel", help="cancel a job on a cluster service",
                                 description="A queued job never starts; a running one's workers leave at the step "
                                 "boundary and its master stops (its run directory keeps its last checkpoint).")
    cancel.add_argument("id", metavar="ID", help="the job's id, as `vnodes submit` printed it")
    _cluster_option(cancel)


def cluster_command(args: argparse.Namespace) -> int:
    from ..servicer import host_port, is_loopback
    from ..errors import InsecureListen
    from .pools import LocalPool, RayPool
    from .registry import StateDir
    from .service import ClusterService
    from .service_rpc import serve_cluster

    if not is_loopback(args.host) and not args.token:
        raise InsecureListen(args.host)
    if not args.interval > 0:
        raise VnodesError(f"--interval {args.interval} is not a positive number of seconds")
    state_dir = StateDir(args.run_dir)
    state_dir.open()
    if args.launcher == "ray":
        try:
            pool = RayPool(args.workers, num_cpus=args.num_cpus, address=args.address)
        except ImportError as exc:
            raise VnodesError(str(exc)) from None
    else:
        pool = _local_pool(args.workers)
    service = ClusterService(state_dir, pool, policy=args.policy, host=args.host, interval_s=args.interval)
    server, port = serve_cluster(service, args.host, args.port, args.token)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"vnodes cluster listening on {host_port(args.host, port)}: {pool.size} {pool.kind} workers, policy "
          f"{args.policy}, state in {state_dir.path}", flush=True)
    try:
        service.run(stop)
    finally:
        server.stop(grace=0.5)
        service.close()
        state_dir.close()
    running = [j["id"] for j in service.jobs() if j["state"] in ("queued", "running")]
    if running and args.launcher == "local":
        print(f"vnodes cluster stopped; jobs {', '.join(running)} go on: start it again on {state_dir.path} to "
              "manage them", file=sys.stderr)
    return 0


def _local_pool(workers):
    from ..devices import assign_devices, visible_cuda_devices
    from .pools import LocalPool

    gpus = visible_cuda_devices()
    size = workers or (gpus if gpus else max(1, os.cpu_count() or 1))
    devices = ["cpu"] * size if not gpus else assign_devices(size, gpus)
    return LocalPool(size, devices)


def submit_command(args: argparse.Namespace) -> int:
    from ..cli import _job_path, load_job, pack_job_folder
    from ..job_options import apply_job_options
    from .service_rpc import ClusterClient

    parse_overrides(args.overrides)  # a typo fails before the job file is imported
    path, name = _job_path(args.job)
    run_dir = str(Path(args.run_dir).expanduser().absolute())
    spec = apply_job_options(load_job(args.job), args)
    spec.validate()
    spec.check_picklable("the cluster's worker processes")
    code = pack_job_folder(args.job, run_dir)
    relative = path.relative_to(Path(code.folder)).as_posix() + (f":{name}" if name else "")
    client = ClusterClient(args.cluster, args.token)
    try:
        job_id = client.submit(name=name or path.stem, job=relative, code=code.data, steps=args.steps,
                               priority=args.priority, run_dir=run_dir, deterministic=args.deterministic,
                               overrides=list(args.overrides), virtual_nodes=spec.virtual_nodes,
                               requested_workers=args.workers or 0, checkpoint_every=args.checkpoint_every or 0)
    finally:
        client.close()
    print(json.dumps({"id": job_id}) if args.json else job_id)
    return 0


def jobs_command(args: argparse.Namespace) -> int:
    from .service_rpc import ClusterClient

    client = ClusterClient(args.cluster, args.token)
    try:
        listing = client.jobs()
    finally:
        client.close()
    if args.json:
        print(json.dumps(listing["jobs"]))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.cluster}: {listing['pool_workers']} workers, policy {listing['policy']}",
                  title_justify="left")
    for column in ("id", "name", "state", "priority", "workers", "step", "resizes", "message"):
        table.add_column(column, justify="right" if column in ("priority", "workers", "resizes") else "left")
    for j in listing["jobs"]:
        table.add_row(j["id"], j["name"], j["state"], str(j["priority"]), f"{j['workers']}/{j['virtual_nodes']}",
                      f"{j['step']}/{j['steps']}", str(j["resizes"]), j["message"])
    Console(width=max(100, Console().width)).print(table)
    return 0


def cancel_command(args: argparse.Namespace) -> int:
    from .service_rpc import ClusterClient

    client = ClusterClient(args.cluster, args.token)
    try:
        state = client.cancel(args.id)
    finally:
        client.close()
    print(f"{args.id}: {state}" if state == "cancelled" else f"{args.id}: {state} (cancelling: its workers leave "
          "at the step boundary)" if state in ("queued", "running") else f"{args.id}: already {state}")
    return 0
