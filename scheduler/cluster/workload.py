"""Cluster workloads: the jobs of a trace, each with its arrival, demand, fixed batch and work.

Two trace formats load into one :class:`TraceJob` list, sorted by arrival:

* **Pollux** (``traces/pollux/workloads/workload-<n>.csv``; columns ``name, time, application,
  num_replicas, batch_size``). ``num_replicas`` and ``batch_size`` are the "TunedJobs"
  configuration Pollux's generator picked per job (``workload.py``: a random choice among the
  GPU counts whose estimated speedup over one GPU is 50-80% efficient, each with its fastest
  validated batch size). Tiresias+TunedJobs runs each job at exactly that GPU count and batch;
  the work is ``Application.steps_to_complete(batch_size)`` (see ``apps``). Priority is 1.
* **VirtualFlow** (``traces/virtualflow/*.json``; a list of objects with ``arrival_time``,
  ``workload`` (resnet | bert | transformer), ``priority`` (default 1, as VirtualFlow's
  ``generate_schedule_from_trace`` does), ``gpu_demand``, ``batch_size`` (global),
  ``num_epochs`` and/or ``num_steps``, ``num_virtual_nodes_per_device`` (default 1), and
  ``dataset`` (resnet) or ``glue_task`` (bert)). The jobs carry no names: job ``i`` is named
  ``<workload>-<i>``. The work is ``apps.virtualflow_steps``; the application is the
  configuration's :class:`~vnodes.scheduler.cluster.apps.VirtualFlowProfile` name, which exists
  for every ``medium20_*`` job (the ``3jobs_*`` traces load, but no duration is known for their
  configurations: ``apps.application_for`` says so).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

from . import apps as apps_mod

POLLUX_COLUMNS = ("name", "time", "application", "num_replicas", "batch_size")
WORKLOADS_DIR = apps_mod.TRACES_DIR / "pollux" / "workloads"
VIRTUALFLOW_DIR = apps_mod.TRACES_DIR / "virtualflow"


@dataclasses.dataclass(frozen=True)
class TraceJob:
    """One job of a trace: what its user asked for, and how much training it needs.

    ``virtual_nodes`` is fixed by VirtualFlow traces (``gpu_demand`` x
    ``num_virtual_nodes_per_device``); Pollux traces do not fix it (``None``: the simulator
    chooses). ``target_steps`` is the job's total work in training steps at ``global_batch``.
    """

    name: str
    arrival_s: float
    application: str
    requested_gpus: int
    global_batch: int
    target_steps: int
    priority: int = 1
    virtual_nodes: int | None = None

    def __post_init__(self):
        if not self.name:
            raise ValueError("TraceJob.name must be non-empty")
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"job {self.name!r}: arrival_s must be a finite number >= 0, "
                             f"got {self.arrival_s!r}")
        for field in ("requested_gpus", "global_batch", "target_steps", "priority"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"job {self.name!r}: {field} must be a positive integer, "
                                 f"got {value!r}")
        vnodes = self.virtual_nodes
        if vnodes is not None and (not isinstance(vnodes, int) or vnodes < self.requested_gpus):
            raise ValueError(f"job {self.name!r}: virtual_nodes must be an integer >= "
                             f"requested_gpus ({self.requested_gpus}), got {self.virtual_nodes!r}")


def load_workload(path, applications: dict | None = None) -> list[TraceJob]:
    """The jobs of a Pollux CSV (``.csv``) or VirtualFlow JSON (``.json``) trace, by arrival.

    ``applications`` (default: ``apps.load_applications()``) prices Pollux jobs' work.

    Raises:
        ValueError: naming the file, the line or job, the field and the fix, for malformed input.
    """
    path = Path(path)
    if path.suffix == ".csv":
        if applications is None:
            applications = apps_mod.load_pollux_applications()
        jobs = _load_pollux(path, applications)
    elif path.suffix == ".json":
        jobs = _load_virtualflow(path)
    else:
        raise ValueError(f"{path}: unknown trace format {path.suffix!r}; use a Pollux workload "
                         f"CSV ({', '.join(POLLUX_COLUMNS)}) or a VirtualFlow JSON list")
    return sorted(jobs, key=lambda j: j.arrival_s)  # stable: ties keep file order


def pollux_workloads() -> list[Path]:
    """The eight Pollux evaluation workloads, ``workload-1.csv`` .. ``workload-8.csv``."""
    return [WORKLOADS_DIR / f"workload-{i}.csv" for i in range(1, 9)]


def _int(text: str, where: str, field: str, fix: str) -> int:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise ValueError(f"{where}: field {field!r} = {text!r} is not a positive integer; {fix}")
    return int(value)


def _load_pollux(path: Path, applications: dict) -> list[TraceJob]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in POLLUX_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing}; a Pollux workload's header "
                             f"is {','.join(POLLUX_COLUMNS)}")
        jobs, seen = [], set()
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(row[c] is None for c in POLLUX_COLUMNS):
                raise ValueError(f"{where}: expected {len(header)} fields, got a row of another "
                                 f"length; fix the row to match the header")
            name = row["name"].strip()
            if not name:
                raise ValueError(f"{where}: field 'name' is empty; give every job a unique name")
            if name in seen:
                raise ValueError(f"{where}: job name {name!r} appears twice; names must be unique")
            seen.add(name)
            try:
                arrival = float(row["time"])
            except ValueError:
                arrival = math.nan
            if not (math.isfinite(arrival) and arrival >= 0):
                raise ValueError(f"{where}: field 'time' = {row['time']!r} is not an arrival "
                                 f"time in seconds >= 0")
            app = row["application"].strip()
            if app not in applications:
                known = sorted(k for k in applications if not k.startswith("vf-"))
                raise ValueError(f"{where}: field 'application' = {app!r} is unknown; expected "
                                 f"one of {known}")
            gpus = _int(row["num_replicas"], where, "num_replicas", "the GPUs the job asks for")
            batch = _int(row["batch_size"], where, "batch_size", "the job's global batch size")
            try:
                steps = applications[app].steps_to_complete(batch)
            except ValueError as e:
                raise ValueError(f"{where}: field 'batch_size' = {batch}: {e}") from None
            jobs.append(TraceJob(name=name, arrival_s=arrival, application=app,
                                 requested_gpus=gpus, global_batch=batch, target_steps=steps))
    if not jobs:
        raise ValueError(f"{path}: no jobs after the header")
    return jobs


def _load_virtualflow(path: Path) -> list[TraceJob]:
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a VirtualFlow trace is a "
                         f"JSON list of job objects") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of job objects, got "
                         f"{type(entries).__name__}")
    jobs = []
    for i, entry in enumerate(entries):
        where = f"{path}: job #{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")

        def positive_int(field, default=None, required=True):
            value = entry.get(field, default)
            if value is None and not required:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: field {field!r} = {value!r} must be a positive "
                                 f"integer")
            return value

        workload = entry.get("workload")
        if workload not in apps_mod.VIRTUALFLOW_WORKLOADS:
            raise ValueError(f"{where}: field 'workload' = {workload!r} is unknown; expected one "
                             f"of {list(apps_mod.VIRTUALFLOW_WORKLOADS)}")
        arrival = entry.get("arrival_time")
        if (not isinstance(arrival, (int, float)) or isinstance(arrival, bool)
                or not math.isfinite(arrival) or arrival < 0):
            raise ValueError(f"{where}: field 'arrival_time' = {arrival!r} must be seconds >= 0")
        demand = positive_int("gpu_demand")
        batch = positive_int("batch_size")
        priority = entry.get("priority") or 1  # VirtualFlow reads a missing or 0 priority as 1
        if not isinstance(priority, int) or isinstance(priority, bool) or priority < 1:
            raise ValueError(f"{where}: field 'priority' = {priority!r} must be a positive "
                             f"integer (a weight: VirtualFlow uses 1, 5, 10)")
        vn = positive_int("num_virtual_nodes_per_device", 1)
        epochs = positive_int("num_epochs", required=False)
        steps = positive_int("num_steps", required=False)
        dataset = entry.get("dataset") if workload == "resnet" else entry.get("glue_task", "")
        if workload == "transformer":
            dataset = ""
        try:
            target = apps_mod.virtualflow_steps(workload, batch, dataset or "", epochs, steps)
        except ValueError as e:
            field = "dataset" if workload == "resnet" else "glue_task"
            raise ValueError(f"{where}: {e} (fields {field!r}, 'num_epochs', 'num_steps')"
                             ) from None
        jobs.append(TraceJob(
            name=f"{workload}-{i}", arrival_s=float(arrival),
            application=apps_mod.virtualflow_profile_name(workload, dataset or "", demand, batch,
                                                          vn, epochs, steps),
            requested_gpus=demand, global_batch=batch, target_steps=target, priority=priority,
            virtual_nodes=demand * vn))
    return jobs
