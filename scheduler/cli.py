"""The ``vnodes`` command line.

    vnodes run path/to/job.py[:name] --steps K [--checkpoint-dir D] [--deterministic]
    vnodes analyze RUN_DIR [--job path/to/job.py[:name]] [--epochs E] [--k K] [--metric euclidean|dtw]
    vnodes simulate WORKLOAD [--policy NAME|all] [--gpus N] [--resize-cost S] [--json] [--out DIR]
    vnodes cluster / submit / jobs / cancel: a service sharing workers among jobs (cluster/commands.py)

A job file defines a ``JobSpec`` (or a zero-argument function returning one). Without ``:name`` the
file's ``spec`` is used, else its only ``JobSpec``, else a function called ``job``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from vnodes.runtime import JobSpec, VnodesError, train
from vnodes.runtime.logs import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging, set_log_context

from .devices import on_first_device, parse_device_list
from .job_options import add_job_options, apply_job_options, int_in_range, parse_overrides, seconds_at_least

EXIT_USAGE = 2


class JobFileError(VnodesError):
    """The job file cannot be loaded or defines no usable ``JobSpec``."""


class RunDirError(VnodesError):
    """``vnodes analyze``: the run directory holds nothing to analyze, or the job does not match it."""


class SimulationInputError(VnodesError):
    """``vnodes simulate``: the workload, the policy or the cluster size cannot be simulated."""


def _job_path(target: str) -> tuple[Path, str]:
    """The file and the name of ``path/to/job.py[:name]``. Raises ``JobFileError`` if it is missing."""
    path_text, _, name = target.partition(":")
    path = Path(path_text).expanduser().absolute()
    if not path.is_file():
        raise JobFileError(f"job file {path_text!r} does not exist; pass path/to/job.py[:name]")
    return path, name


def pack_job_folder(target: str, run_dir: Optional[str | os.PathLike]):
    """The job file's folder, packed for workers in other processes (``code_package.py``), leaving
    out the run directory. Done first: a folder past the cap fails before anything slow.

    Raises:
        JobFileError: the job file is missing.
        CodeTooLarge: the folder passes the cap (``VNODES_MAX_CODE_BYTES``).
    """
    from .code_package import CodePackage

    path, _ = _job_path(target)
    return CodePackage.from_folder(path.parent, exclude=[run_dir] if run_dir else [])


def load_job(target: str) -> JobSpec:
    """Load ``path/to/job.py[:name]``.

    The file is imported as a module named after it, with its folder on ``sys.path``, so the
    functions it defines pickle by reference into spawned processes.

    Raises:
        JobFileError: the file is missing, fails to import, or defines no ``JobSpec``.
    """
    path, name = _job_path(target)
    path_text = target.partition(":")[0]
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = path.stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise JobFileError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise JobFileError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc

    if name:
        if not hasattr(module, name):
            raise JobFileError(f"{path} has no attribute {name!r}")
        obj = getattr(module, name)
    else:
        specs = {k: v for k, v in vars(module).items() if isinstance(v, JobSpec)}
        if "spec" in specs:
            obj = specs["spec"]
        elif len(specs) == 1:
            obj = next(iter(specs.values()))
        elif callable(getattr(module, "job", None)):
            obj = module.job
        else:
            found = ", ".join(sorted(specs)) or "none"
            raise JobFileError(
                f"{path} defines JobSpecs {found}; name one with {path_text}:NAME "
                "(or define `spec = JobSpec(...)` or a function `job()` returning one)"
            )
    if not isinstance(obj, JobSpec) and callable(obj):
        obj = obj()
    if not isinstance(obj, JobSpec):
        raise JobFileError(f"{target} is a {type(obj).__name__}, not a JobSpec (or a function returning one)")
    return obj


_COUNT, _PORT = int_in_range(1), int_in_range(0, 65535)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vnodes",
        description="Elastic virtual-node data-parallel training for PyTorch. A job has a fixed number "
        "of virtual nodes; its trajectory does not depend on how many workers run it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                        help="text (default) or json: one object per line with the job, the membership epoch and "
                        f"the step (env {LOG_FORMAT_ENV})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="train a job",
        description="Train the JobSpec defined in a Python file until --steps global steps are applied. "
        "With --checkpoint-dir, resume from its latest checkpoint and write one at the end.",
    )
    add_job_options(run, run_dir_required=False)
    run.add_argument("--workers", type=_COUNT, default=1, metavar="M",
                     help="local worker processes (default 1: in this process); more start a master here")
    run.add_argument("--devices", type=parse_device_list, metavar="I,J,...",
                     help="the GPUs to use, one per worker, worker i on the i-th (torch's numbers, within "
                     "CUDA_VISIBLE_DEVICES; default: every visible GPU; CPU-only machines: the CPU)")
    run.add_argument("--share-devices", action="store_true",
                     help="allow more workers than GPUs: worker i on GPU i mod G (else that is an error)")
    run.add_argument("--master-port", type=_PORT, default=0, metavar="P",
                     help="with --workers > 1: the embedded master's gRPC port (default: any free port)")
    run.add_argument("--launcher", choices=("local", "ray"), default="local",
                     help="local processes (default) or one actor per device of a Ray cluster")
    run.add_argument("--address", help="Ray cluster address for --launcher ray ('auto', HOST:PORT); "
                     "default: start Ray locally")
    run.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each Ray worker asks for (CPU nodes)")
    run.add_argument("--no-progress", action="store_true", help="no live progress display")
    run.add_argument("--json", action="store_true", help="print the result summary as JSON on stdout")
    run.add_argument("--log", action="append", default=[], choices=("tensorboard", "csv", "mlflow"),
                     help="also log every step's metrics: tensorboard (RUN_DIR/tensorboard/), csv "
                     "(RUN_DIR/metrics.csv) or mlflow (the active run); repeatable. RUN_DIR/metrics.jsonl "
                     "is always written")

    master = commands.add_parser(
        "master", help="run only the master of a job (workers join with `vnodes worker`)",
        description="Serve a job's master. Workers started anywhere with `vnodes worker --master HOST:PORT` "
        "join at the next step boundary. Listening beyond 127.0.0.1 requires --token.",
    )
    add_job_options(master, run_dir_required=True)
    master.add_argument("--port", type=_PORT, default=29400, help="gRPC port (default 29400; 0 picks one)")
    master.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    master.add_argument("--token", default=os.environ.get("VNODES_TOKEN"),
                        help="shared token that workers must present (env VNODES_TOKEN)")
    master.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (needs --tls-key); "
                        "workers then pass --tls-ca")
    master.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    master.add_argument("--placement", choices=("throughput", "even"), default="throughput")
    master.add_argument("--min-workers", type=_COUNT, default=1, help="workers to wait for before step 0")
    master.add_argument("--start-grace", type=seconds_at_least(0), default=60.0, metavar="SECONDS",
                        help="restarted on a run directory: wait this long for the previous master's workers "
                        "to reconnect (those holding newer state than the checkpoint, and those that must hear "
                        "the job's end) before going on without them (default 60)")
    master.add_argument("--heartbeat-timeout", type=seconds_at_least(3), default=10.0, metavar="SECONDS",
                        help="declare a worker dead after this long without a heartbeat (workers send one "
                        "every second; default 10)")
    master.add_argument("--metrics-port", type=_PORT, metavar="P",
                        help="serve Prometheus metrics on http://METRICS_HOST:P/metrics (0 picks a port; "
                        "needs prometheus-client)")
    master.add_argument("--metrics-host", default="127.0.0.1",
                        help="the metrics endpoint's address (default 127.0.0.1)")

    worker = commands.add_parser("worker", help="join a running job as a worker",
                                 description="Join a running job; SIGTERM drains (finishes the step, leaves).")
    from vnodes.runtime.agent import add_worker_arguments

    add_worker_arguments(worker)

    analyze = commands.add_parser(
        "analyze", help="report which samples look mislabeled, corrupted, atypical or typical",
        description="Classify every training sample of a finished (or running) job by its loss trajectory "
        "among the probe suites that MetadataArchaeology planted (MAP-D), and write RUN_DIR/analysis/: "
        "report.html (numbers, plots, the most-flagged samples) and samples.csv (p(suite) of every sample). "
        "The job must have run with plugins=[DynamicsRecorder(), MetadataArchaeology()] and "
        "--checkpoint-dir RUN_DIR.",
    )
    analyze.add_argument("run_dir", metavar="RUN_DIR", help="the --checkpoint-dir of the run")
    analyze.add_argument("--job", metavar="JOB.py[:NAME]",
                         help="the job file the run trained (and any --set it was given): its dataset shows "
                         "the most-flagged samples' inputs, as trained on (default: their loss curves)")
    analyze.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                         help="with --job: a --set the run was trained with (the seed decides which samples "
                         "are probes)")
    analyze.add_argument("--epochs", type=int_in_range(1), metavar="E",
                         help="classify by the first E recorded epochs (default: every recorded epoch)")
    analyze.add_argument("--k", type=int_in_range(1), metavar="K",
                         help="neighbours in the vote (default: the job's MetadataArchaeology(k=...), MAP-D's 20)")
    analyze.add_argument("--metric", choices=("euclidean", "dtw"),
                         help="distance between trajectories (default: the job's; dtw needs dtaidistance)")

    simulate = commands.add_parser(
        "simulate", help="simulate a cluster scheduling policy on a workload trace",
        description="Replay a workload trace on a simulated GPU cluster under a scheduling policy and report "
        "job completion times (JCT), makespan and utilization. WORKLOAD is a Pollux workload CSV (name, time, "
        "application, num_replicas, batch_size; simulated on 64 GPUs, decisions every 60 s) or a VirtualFlow "
        "JSON trace (8 GPUs, decisions every 60 s and at every arrival and completion). The shipped traces are "
        "in vnodes/scheduler/cluster/traces/.",
    )
    simulate.add_argument("workload", metavar="WORKLOAD", help="a Pollux .csv or a VirtualFlow .json trace")
    simulate.add_argument("--policy", default="vnodes", metavar="NAME",
                          help="fifo, priority, tiresias, wfs, vnodes (default), or all: every policy side by side")
    simulate.add_argument("--gpus", metavar="N",
                          help="GPUs in the cluster, in nodes of 4 (N <= 4: one node of N; default: 64 for a "
                          "Pollux CSV, 8 for a VirtualFlow JSON)")
    simulate.add_argument("--resize-cost", metavar="S",
                          help="charge every start, resume and resize a flat S seconds without progress, for "
                          "every policy (default: vnodes' measured costs for vnodes, VirtualFlow's for wfs on a "
                          "VirtualFlow trace, 30 s otherwise as Pollux charges)")
    simulate.add_argument("--json", action="store_true",
                          help="print one JSON object: avg_jct_s, median_jct_s, p99_jct_s, makespan_s, "
                          "utilization, ftf_mean, ftf_max, resizes_per_job, preemptions_per_job, jcts "
                          "{job: seconds}, ...; with --policy all: policies {name: those}")
    simulate.add_argument("--out", metavar="DIR",
                          help="also write DIR/simulation.json (the --json object), jct_cdf.png and "
                          "gpus_in_use.png (needs matplotlib)")

    from .cluster.commands import add_cluster_commands

    add_cluster_commands(commands)

    status = commands.add_parser("status", help="show a running job's status")
    status.add_argument("--master", required=True, metavar="HOST:PORT")
    status.add_argument("--token", default=os.environ.get("VNODES_TOKEN"))
    status.add_argument("--tls-ca", metavar="PEM", default=os.environ.get("VNODES_TLS_CA"),
                        help="CA certificate of a master started with --tls-cert (env VNODES_TLS_CA)")
    status.add_argument("--json", action="store_true",
                        help="print JSON instead of a table: step, steps, epoch, membership_epoch, state, loss, "
                             "evaluation ({step, metric: mean} or null), aborted (count), last_abort ({step, "
                             "membership_epoch, reason, attempt, time} or null), "
                             "workers[{id, pid, host, device, vnodes, step_time_s, state}]")
    return parser


def _run(args: argparse.Namespace) -> int:
    code = None
    if args.launcher == "ray":  # actors may run on other machines: they fetch the job file's folder
        code = pack_job_folder(args.job, args.run_dir)
    parse_overrides(args.overrides)  # a typo fails before the job file is imported
    from vnodes.runtime.loggers import logger_named

    loggers = [logger_named(name, args.run_dir) for name in dict.fromkeys(args.log)]  # before the slow part
    spec = apply_job_options(load_job(args.job), args)
    launch_options = {"master_port": args.master_port} if args.workers > 1 and args.launcher == "local" else None
    if args.devices is not None and args.launcher != "local":
        raise VnodesError("--devices is for --launcher local: Ray gives each worker actor a GPU of its own")
    if launch_options is not None:
        launch_options.update(devices=args.devices, share_devices=args.share_devices)
    elif args.devices is not None:  # one worker, in this process: on the first device asked for
        spec = on_first_device(spec, args.devices)
    if args.launcher == "ray":
        from .launcher_ray import RayWorkerOptions

        launch_options = {"worker_options": RayWorkerOptions(num_cpus=args.num_cpus)}
    if launch_options is not None:
        launch_options["code"] = code
    result = train(spec, steps=args.steps, checkpoint_dir=args.run_dir,
                   checkpoint_every=args.checkpoint_every, workers=args.workers, launcher=args.launcher,
                   address=args.address, launch_options=launch_options, callbacks=loggers,
                   progress=False if args.no_progress else True)
    summary = {
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "samples_per_s": round(result.samples_per_s, 1),
        "wall_time_s": round(result.wall_time_s, 3),
        "checkpoint_dir": result.checkpoint_dir,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        loss = "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
        print(f"done: {result.steps} steps, final loss {loss}, {result.samples_per_s:,.0f} samples/s"
              + (f", checkpoint in {result.checkpoint_dir}" if result.checkpoint_dir else ""))
    return 0


def _master(args: argparse.Namespace) -> int:
    from .durable import clear_outcome, write_outcome
    from .launcher import start_master
    from vnodes.runtime.checkpoint import check_checkpoint_dir

    from vnodes.runtime.master_client import read_pem

    from .errors import InsecureListen
    from .prometheus import serve_metrics
    from .servicer import host_port, is_loopback

    if not is_loopback(args.host) and not args.token:  # before anything is built
        raise InsecureListen(args.host)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise VnodesError("TLS needs both --tls-cert and --tls-key (got only "
                          f"{'--tls-cert' if args.tls_cert else '--tls-key'})")
    tls = (read_pem(args.tls_key, "--tls-key"), read_pem(args.tls_cert, "--tls-cert")) if args.tls_cert else None
    run_dir = check_checkpoint_dir(args.run_dir)
    parse_overrides(args.overrides)
    code = pack_job_folder(args.job, run_dir)
    spec = apply_job_options(load_job(args.job), args)
    clear_outcome(run_dir)
    set_log_context(job=args.job)
    handle = start_master(spec, args.steps, run_dir, checkpoint_every=args.checkpoint_every or 0,
                          expected_workers=args.min_workers, host=args.host, port=args.port, token=args.token,
                          placement=args.placement, tls=tls, code=code, start_grace_s=args.start_grace,
                          heartbeat_timeout_s=args.heartbeat_timeout)
    try:
        endpoint = serve_metrics(handle.master, spec.global_batch_size, args.metrics_host, args.metrics_port)
    except VnodesError:
        handle.stop()
        raise
    print(f"vnodes master listening on {handle.address} (run dir {args.run_dir})", flush=True)
    if endpoint is not None:
        print(f"metrics on http://{host_port(args.metrics_host, endpoint.port)}/metrics", flush=True)
    try:
        handle.wait_for_end()  # until every worker has heard the end or is gone (bounded)
    finally:
        handle.stop()
        if endpoint is not None:
            endpoint.stop()
    failure = handle.master.failure
    if failure:
        write_outcome(run_dir, "failed", handle.master.step, failure.message, failure.error_type)
        print(f"vnodes: job failed: {failure.message}", file=sys.stderr)
        return 1
    write_outcome(run_dir, "done", handle.master.step)
    print(f"done: {handle.master.step} steps", flush=True)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from vnodes.runtime.agent import run_worker

    return run_worker(args)


def _analyze(args: argparse.Namespace) -> int:
    from .plugins.analysis import analyze, read_probes
    from .plugins.recorder import load_dynamics
    from .plugins.report import missing_packages

    if args.overrides and not args.job:
        raise VnodesError("--set applies to the job file's dataset; pass --job JOB.py with it")
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {str(run_dir)!r} does not exist; pass the --checkpoint-dir of a run "
                          "trained with plugins=[DynamicsRecorder(), MetadataArchaeology()]")
    missing = missing_packages()
    if missing:  # before the slow part
        raise VnodesError(f"vnodes analyze draws its report with matplotlib and scikit-learn; install them: "
                          f"pip install {' '.join(missing)}")
    try:
        probes, _ = read_probes(run_dir)
        num_samples = load_dynamics(run_dir, "eval").num_samples
    except (FileNotFoundError, ValueError) as exc:
        raise RunDirError(str(exc)) from exc
    dataset = _analyzed_dataset(args, run_dir, probes, num_samples) if args.job else None

    def progress(done: int, total: int) -> None:
        print(f"\rclassifying {done:,}/{total:,} samples", end="" if done < total else "\n", file=sys.stderr,
              flush=True)

    try:
        report = analyze(run_dir, epochs=args.epochs, k=args.k, metric=args.metric, dataset=dataset,
                         progress=progress if sys.stderr.isatty() else None)
    except (FileNotFoundError, ValueError) as exc:
        raise RunDirError(str(exc)) from exc
    except ImportError as exc:  # metric dtw without dtaidistance
        raise VnodesError(str(exc)) from exc
    import numpy as np

    most_likely = report.most_likely()
    most_likely[~np.isfinite(report.p[report.suites[0]])] = -1  # no complete trajectory: not classified
    shares = []
    for j, suite in enumerate(report.suites):
        count = int((most_likely == j).sum())
        shares.append(f"{suite} {count:,} ({count / report.num_samples:.1%})")
    unclassified = int((most_likely < 0).sum())
    if unclassified:
        shares.append(f"not classified (no complete trajectory) {unclassified:,}")
    correct, total = int(report.confusion.trace()), int(report.confusion.sum())
    accuracy = f"{report.heldout_accuracy:.1%} ({correct}/{total})" if total else "n/a (no held-out probe recorded)"
    plots = sorted(name for name in report.files if name.endswith(".png"))
    print(f"{report.num_samples:,} samples, {report.epochs} epochs, k={report.k}, {report.metric}: "
          f"held-out probes classified correctly {accuracy}")
    print("most likely suite: " + ", ".join(shares))
    print(f"report: {report.files['report.html']} (with {', '.join(plots)}); every sample: "
          f"{report.files['samples.csv']}")
    return 0


def _analyzed_dataset(args: argparse.Namespace, run_dir: Path, probes, num_samples: int):
    """The job's dataset as the workers trained on it (probes altered), checked against the run.

    Raises:
        JobFileError, BadOverride, InvalidJobSpec: as for ``vnodes run``.
        RunDirError: the dataset's size or probes are not the run's.
    """
    from vnodes.runtime.engine import build_dataset

    from .plugins.probes import ProbedDataset

    spec = apply_job_options(load_job(args.job), argparse.Namespace(overrides=args.overrides, deterministic=False))
    dataset = build_dataset(spec)
    if len(dataset) != num_samples:
        raise RunDirError(f"{args.job} builds a dataset of {len(dataset):,} samples, {run_dir} recorded "
                          f"{num_samples:,}; pass the job file the run trained")
    if isinstance(dataset, ProbedDataset) and "mislabeled" in probes.suites:
        planted = set(probes.probes()["mislabeled"].tolist())
        if planted != set(dataset.altered.mislabeled.tolist()):
            raise RunDirError(f"{args.job} plants other probes than {run_dir} holds (another seed or "
                              "MetadataArchaeology setting?); pass the job file the run trained, with the "
                              "--set options it was given")
    return dataset


def _simulate(args: argparse.Namespace) -> int:
    from .cluster import report
    from .cluster.apps import TRACES_DIR, application_for, load_applications
    from .cluster.policies import POLICIES
    from .cluster.simulator import Cluster, simulate
    from .cluster.workload import load_workload

    path = Path(args.workload).expanduser()
    if not path.is_file():
        raise SimulationInputError(f"workload {args.workload!r} does not exist; pass a Pollux workload CSV or a "
                                   f"VirtualFlow JSON trace (shipped: {TRACES_DIR}/pollux/workloads/workload-1.csv)")
    if path.suffix not in (".csv", ".json"):
        raise SimulationInputError(f"workload {args.workload!r} is neither a .csv (Pollux) nor a .json "
                                   "(VirtualFlow) trace; pass one of those")
    virtualflow = path.suffix == ".json"
    if args.policy == "all":
        policies = list(POLICIES)
    elif args.policy in POLICIES:
        policies = [args.policy]
    else:
        raise SimulationInputError(f"--policy {args.policy!r} is unknown; choose one of {', '.join(POLICIES)}, "
                                   "or all")
    gpus = _positive_gpus(args.gpus) if args.gpus is not None else (8 if virtualflow else 64)
    cost = _resize_cost(args.resize_cost) if args.resize_cost is not None else None
    if args.out and report.missing_packages():  # before the slow part
        raise VnodesError(f"--out draws its plots with matplotlib; install it: pip install "
                          f"{' '.join(report.missing_packages())} (or leave out --out)")
    profiles = load_applications()
    try:
        jobs = load_workload(path, profiles)
        for job in jobs:
            application_for(job, profiles)
    except ValueError as exc:
        raise SimulationInputError(str(exc)) from exc
    biggest = max(jobs, key=lambda j: j.requested_gpus)
    if biggest.requested_gpus > gpus:
        raise SimulationInputError(f"job {biggest.name!r} asks for {biggest.requested_gpus} GPUs, more than "
                                   f"--gpus {gpus}; pass --gpus {_cluster_size_for(biggest.requested_gpus)} or more")
    cluster = Cluster.of(gpus)
    results = {}
    for name in policies:
        if sys.stderr.isatty():
            print(f"simulating {name} on {len(jobs)} jobs...", file=sys.stderr, flush=True)
        results[name] = simulate(jobs, name, cluster, simulation_resize(name, virtualflow, cost), profiles,
                                 on_events=virtualflow)
    doc = report.document(results, str(path), on_events=virtualflow, interval_s=60.0)
    files = report.write_outputs(Path(args.out).expanduser(), results, doc) if args.out else {}
    if args.json:
        print(json.dumps(doc))
        if files:
            print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
        return 0
    from rich.console import Console

    clock = "every 60 s and at every arrival and completion" if virtualflow else "every 60 s"
    title = (f"{path.name}: {len(jobs)} jobs on {cluster.gpus} GPUs ({cluster.nodes} x {cluster.gpus_per_node}), "
             f"decisions {clock}")
    Console(width=max(140, Console().width)).print(report.table(results, title))
    if files:
        print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0


def simulation_resize(policy: str, virtualflow: bool, flat_cost_s: Optional[float] = None):
    """The resize model ``vnodes simulate`` charges ``policy``: a flat ``flat_cost_s`` for every
    policy when given; else vnodes' own costs for vnodes, VirtualFlow's for wfs on a VirtualFlow
    trace, and Pollux's flat 30 s for the rest."""
    from .cluster.simulator import flat_resize, virtualflow_resize, vnodes_resize

    if flat_cost_s is not None:
        return flat_resize(flat_cost_s)
    if policy == "vnodes":
        return vnodes_resize()
    if policy == "wfs" and virtualflow:
        return virtualflow_resize()
    return flat_resize(30.0)


def _cluster_size_for(gpus: int) -> int:
    """The smallest ``--gpus`` that holds ``gpus``: itself up to 4, then a multiple of 4."""
    return gpus if gpus <= 4 else -(-gpus // 4) * 4


def _positive_gpus(text: str) -> int:
    try:
        gpus = int(text)
    except ValueError:
        raise SimulationInputError(f"--gpus {text!r} is not a whole number; pass the cluster's GPU count, "
                                   "e.g. --gpus 64") from None
    if gpus < 1:
        raise SimulationInputError(f"--gpus {gpus} is not positive; pass the cluster's GPU count, e.g. --gpus 64")
    if gpus > 4 and gpus % 4:
        raise SimulationInputError(f"--gpus {gpus}: clusters of more than 4 GPUs are built of nodes of 4; pass a "
                                   f"multiple of 4, e.g. --gpus {_cluster_size_for(gpus)}")
    return gpus


def _resize_cost(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise SimulationInputError(f"--resize-cost {text!r} is not a number of seconds >= 0; pass e.g. "
                                   "--resize-cost 30 (Pollux's cost per start and resize)")
    return seconds


def _status(args: argparse.Namespace) -> int:
    from vnodes.runtime.master_client import MasterClient, read_pem

    client = MasterClient(args.master, args.token, read_pem(args.tls_ca, "--tls-ca") if args.tls_ca else None)
    try:
        status = client.status()
    finally:
        client.close()
    if args.json:
        print(json.dumps(status))
        return 0
    from rich.console import Console
    from rich.table import Table

    loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
    evaluation = status.get("evaluation")
    shown = "" if not evaluation else ", evaluation at step {}: {}".format(
        evaluation["step"], ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items() if k != "step"))
    abort = status.get("last_abort")
    caption = None if not abort else (f"{status['aborted']} aborted step(s); the last: step {abort['step']} "
                                      f"(attempt {abort['attempt']}), {abort['reason']}")
    table = Table(title=f"{args.master}: {status['state']}, step {status['step']}/{status['steps']}, "
                        f"data epoch {status['epoch']}, membership epoch {status['membership_epoch']}, loss {loss}"
                        + shown, title_justify="left", caption=caption, caption_justify="left")
    for column in ("worker", "state", "host", "pid", "device", "virtual nodes", "step time"):
        table.add_column(column, justify="right" if column in ("pid", "step time") else "left")
    for w in status["workers"]:
        table.add_row(w["id"], w["state"], w["host"], str(w["pid"]), w["device"], _ranges(w["vnodes"]),
                      f"{w['step_time_s']:.3f} s" if w["step_time_s"] else "-")
    Console(width=max(100, Console().width)).print(table)
    return 0


def _ranges(vnodes: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts: list[str] = []
    for v in vnodes:
        if parts and v == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{v}"
        else:
            parts.append(str(v))
    return ", ".join(parts) or "-"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(logging.INFO if args.verbose else logging.WARNING, args.log_format)
        if args.log_format:  # the workers a launcher starts log the same way
            os.environ[LOG_FORMAT_ENV] = args.log_format
        from .cluster.commands import cancel_command, cluster_command, jobs_command, submit_command

        commands = {"run": _run, "master": _master, "worker": _worker, "analyze": _analyze, "simulate": _simulate,
                    "status": _status, "cluster": cluster_command, "submit": submit_command, "jobs": jobs_command,
                    "cancel": cancel_command}
        return commands[args.command](args)
    except VnodesError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"vnodes: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vnodes: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
