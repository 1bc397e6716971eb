"""The cluster simulator: the same policy code (``policies.py``) on a simulated clock.

    result = simulate(load_workload(path), "vnodes", Cluster(nodes=16, gpus_per_node=4))
    result.metrics()   # average, median and p99 JCT, makespan, utilization, fairness, resizes

**The clock.** Policies are called every ``interval_s`` (60 s, as in Pollux's evaluation) and, with
``on_events=True``, also at every arrival and completion (as VirtualFlow's scheduler does). Between
two calls each running job advances by ``elapsed / step_time(placement)`` steps; a job finishes at
its exact time, and its GPUs come back at the next call.

**A job's speed** is its application profile's (``apps.py``) at the job's fixed global batch ``B``.
Non-elastic policies run a job at exactly its requested GPUs, where the profile's time applies as
measured. An elastic vnodes job has ``V`` virtual nodes (``TraceJob.virtual_nodes``; for Pollux
jobs, the requested GPU count doubled while the batch (``Application.max_gpus``) and the cluster
allow). On ``n`` GPUs
the slowest GPU runs ``ceil(V / n)`` of them, fused as one batch of ``ceil(V / n) * B / V``
samples (or one after another, which the profile's accumulation model prices the same way), so a
step takes the profile's time for a global batch of ``n * ceil(V / n) * B / V``: an uneven split
costs what it costs on real devices.

**Resizes** are charged what they cost (``ResizeModel``):

- ``vnodes`` (the default): a starting or joining worker holds its GPU, useless, for
  ``startup_s`` while the job trains on at its old size; then the job pauses for the measured
  re-formation (``benchmarks/elastic.py``: 0.05 s for a join, 0.13 s for a leave) plus the state
  transfer of its model to the new workers (weights and two optimizer slots in float32, over
  ``bandwidth`` bytes/s). A preempted job resumes like a start.
- ``flat(s)``: every change to a non-empty allocation (start, resume, resize) stops the job for
  ``s`` seconds on its new GPUs, as Pollux charges 30 s per rescale.
- ``virtualflow``: VirtualFlow's own overheads, as its logs measure them: 88 s to start, 2 s to
  shrink, a grow spawned in the background for 70 s (new GPUs held) then 2 s.

**Placement** (``place``): a job keeps the GPUs it has; a job that needs more takes them from the
nodes where it already is, then from the node with the most free GPUs (ties: the lowest index),
which consolidates a job when whole nodes are free and scatters it otherwise (Pollux's Tiresias
places the same way); a shrinking job gives back from the nodes where it has the fewest.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .apps import JobProfile, application_for, consolidated_placement, load_applications
from .policies import ELASTIC, JobView, Snapshot, check_allocation, policy_named
from .workload import TraceJob

# Model sizes (parameters) of the applications, for the vnodes state transfer at a resize.
MODEL_PARAMS = {"imagenet": 25.6e6, "cifar10": 11.2e6, "bert": 110e6, "deepspeech2": 38e6, "yolov3": 62e6,
                "ncf": 4e6, "resnet": 25.6e6, "transformer": 65e6}
DEFAULT_PARAMS = 25.6e6


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int = 16
    gpus_per_node: int = 4

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def of(cls, gpus: int, gpus_per_node: int = 4) -> "Cluster":
        """``gpus`` GPUs in nodes of ``gpus_per_node`` (one node when fewer)."""
        if gpus < 1:
            raise ValueError(f"--gpus {gpus}: a cluster needs at least 1 GPU")
        per = min(gpus_per_node, gpus)
        if gpus % per:
            raise ValueError(f"--gpus {gpus}: not a multiple of {per} GPUs per node")
        return cls(gpus // per, per)


@dataclasses.dataclass(frozen=True)
class ResizeModel:
    """What an allocation change costs a job (module docstring)."""

    name: str
    start_s: float  # a start or resume: the job's GPUs are held, no progress
    pause_s: float  # a shrink or, once its joiners are up, a grow: no progress
    join_s: float = 0.0  # a grow: the new GPUs are held, useless, this long while the job trains on
    bandwidth: float = 0.0  # bytes/s for the state transfer at a grow (0: none)
    grow_pause_s: Optional[float] = None  # the pause of a grow (default: pause_s)

    def transfer_s(self, application: str) -> float:
        if not self.bandwidth:
            return 0.0
        return MODEL_PARAMS.get(application, DEFAULT_PARAMS) * 4 * 3 / self.bandwidth


def vnodes_resize(startup_s: float = 20.0, bandwidth: float = 3e9) -> ResizeModel:
    """vnodes' costs: ``startup_s`` for a worker to start (an assumption: process, CUDA context,
    model and data), the measured re-formation pauses, and the state transfer."""
    return ResizeModel("vnodes", start_s=startup_s, pause_s=0.13, join_s=startup_s, bandwidth=bandwidth,
                       grow_pause_s=0.05)


def flat_resize(seconds: float = 30.0) -> ResizeModel:
    return ResizeModel(f"flat {seconds:g} s", start_s=seconds, pause_s=seconds)


def virtualflow_resize() -> ResizeModel:
    return ResizeModel("virtualflow", start_s=88.0, pause_s=2.0, join_s=70.0)


@dataclasses.dataclass
class SimJob:
    trace: TraceJob
    profile: JobProfile
    virtual_nodes: int
    target_steps: int
    held: list[int]  # GPUs per node it holds (its placement, plus joiners still starting)
    running: list[int]  # GPUs per node it trains on
    steps: float = 0.0
    busy_until: float = 0.0  # no progress before this
    join_at: Optional[float] = None  # when the joiners are up (held != running until then)
    started_s: Optional[float] = None
    finished_s: Optional[float] = None
    attained_gpu_s: float = 0.0
    productive_gpu_s: float = 0.0
    resizes: int = 0
    preemptions: int = 0
    elastic: bool = False

    @property
    def name(self) -> str:
        return self.trace.name

    def step_time(self, placement: Sequence[int]) -> float:
        placement = tuple(g for g in placement if g)
        if not self.elastic or not hasattr(self.profile, "measured_step"):
            return self.profile.step_time(placement, self.trace.global_batch)
        # vnodes: the slowest GPU runs ceil(V / n) virtual nodes, fused (or accumulated past the
        # largest measured local batch, as the profile's model does)
        n = sum(placement)
        local = math.ceil(self.virtual_nodes / n) * self.trace.global_batch / self.virtual_nodes
        accum = math.ceil(local / self.profile.max_local_bsz - 1e-8) - 1
        atomic = math.ceil(local / (accum + 1) - 1e-8)
        step, sync = self.profile.measured_step(placement, atomic)
        return step + accum * (step - sync)


@dataclasses.dataclass
class SimResult:
    policy: str
    resize: str
    cluster: Cluster
    jobs: list[SimJob]
    alone_s: dict[str, float]  # each job's time alone on its requested GPUs (fairness' denominator)
    timeline: list[tuple[float, int, int]]  # (time, GPUs held, GPUs training) at each decision

    def jcts(self) -> dict[str, float]:
        return {j.name: j.finished_s - j.trace.arrival_s for j in self.jobs}

    def metrics(self) -> dict:
        jct = np.array(list(self.jcts().values()))
        first = min(j.trace.arrival_s for j in self.jobs)
        last = max(j.finished_s for j in self.jobs)
        makespan = last - first
        productive = sum(j.productive_gpu_s for j in self.jobs)
        ftf = np.array([(j.finished_s - j.trace.arrival_s) / self.alone_s[j.name] for j in self.jobs])
        return {"policy": self.policy, "resize_model": self.resize, "gpus": self.cluster.gpus, "jobs": len(self.jobs),
                "avg_jct_s": float(jct.mean()), "median_jct_s": float(np.median(jct)),
                "p99_jct_s": float(np.percentile(jct, 99)), "makespan_s": float(makespan),
                "utilization": float(productive / (self.cluster.gpus * makespan)) if makespan > 0 else 0.0,
                "ftf_mean": float(ftf.mean()), "ftf_max": float(ftf.max()),
                "resizes_per_job": float(np.mean([j.resizes for j in self.jobs])),
                "preemptions_per_job": float(np.mean([j.preemptions for j in self.jobs])),
                "jcts": self.jcts()}


def place(free: list[int], held: list[int], count: int) -> list[int]:
    """``held`` (GPUs per node) grown or shrunk to ``count`` GPUs; ``free`` is updated."""
    held = list(held)
    have = sum(held)
    if count < have:  # give back from the nodes where the job has the fewest
        drop = have - count
        for node in sorted((k for k in range(len(held)) if held[k]), key=lambda k: (held[k], -k)):
            take = min(drop, held[node])
            held[node] -= take
            free[node] += take
            drop -= take
            if drop == 0:
                break
        return held
    need = count - have
    for node in [k for k in range(len(held)) if held[k] and free[k]]:  # its own nodes first
        take = min(need, free[node])
        held[node] += take
        free[node] -= take
        need -= take
    while need > 0:
        node = max(range(len(free)), key=lambda k: (free[k], -k))
        if free[node] == 0:
            raise RuntimeError("the policy allocated more GPUs than are free")
        take = min(need, free[node])
        held[node] += take
        free[node] -= take
        need -= take
    return held


class Simulation:
    """One policy on one workload (``simulate`` runs it)."""

    def __init__(self, jobs: Sequence[TraceJob], policy: str, cluster: Cluster, resize: ResizeModel,
                 profiles: Optional[Mapping[str, JobProfile]] = None, interval_s: float = 60.0,
                 on_events: bool = False):
        if not jobs:
            raise ValueError("the workload has no jobs")
        self.policy_name = policy
        self.policy = policy_named(policy)
        self.elastic = policy in ELASTIC
        self.cluster, self.resize, self.interval_s, self.on_events = cluster, resize, interval_s, on_events
        profiles = profiles if profiles is not None else load_applications()
        self.jobs = []
        for trace in sorted(jobs, key=lambda j: (j.arrival_s, j.name)):
            if trace.requested_gpus > cluster.gpus:
                raise ValueError(f"job {trace.name!r} asks for {trace.requested_gpus} GPUs; the cluster has "
                                 f"{cluster.gpus} (--gpus)")
            profile = application_for(trace, profiles)
            vnodes = trace.virtual_nodes or _virtual_nodes(trace, min(cluster.gpus, _max_gpus(profile, trace)))
            job = SimJob(trace, profile, vnodes, trace.target_steps, [0] * cluster.nodes, [0] * cluster.nodes,
                         elastic=self.elastic)
            self.jobs.append(job)
        self.free = [cluster.gpus_per_node] * cluster.nodes
        self.state: Mapping = {}
        self.curves = {j.name: self._curve(j) for j in self.jobs} if self.elastic else {}
        self.timeline: list[tuple[float, int, int]] = []

    def _curve(self, job: SimJob) -> tuple[float, ...]:
        """Steps/s on 1, 2, ... GPUs (consolidated) up to the job's virtual nodes, while defined."""
        out = []
        for n in range(1, min(job.virtual_nodes, self.cluster.gpus) + 1):
            try:
                t = job.step_time(consolidated_placement(n, self.cluster.gpus_per_node))
            except ValueError:
                break
            if not (t > 0 and math.isfinite(t)):
                break
            out.append(1.0 / t)
        return tuple(out) or (1.0 / job.profile.step_time(
            consolidated_placement(job.trace.requested_gpus, self.cluster.gpus_per_node), job.trace.global_batch),)

    # -- time -----------------------------------------------------------------------------------

    def _advance(self, job: SimJob, t0: float, t1: float) -> None:
        """Train ``job`` from ``t0`` to ``t1`` (it may finish in between, or its joiners come up)."""
        if job.finished_s is not None or not any(job.held):
            return
        job.attained_gpu_s += sum(job.held) * (t1 - t0)
        a = t0
        while a < t1 and job.finished_s is None:
            b = t1
            if job.join_at is not None and a <= job.join_at < t1:
                b = job.join_at
            start = max(a, job.busy_until)
            if start < b and any(job.running):
                per_step = job.step_time(job.running)
                steps = (b - start) / per_step
                if job.steps + steps >= job.target_steps:
                    end = start + (job.target_steps - job.steps) * per_step
                    job.productive_gpu_s += sum(job.running) * (end - start)
                    job.steps = job.target_steps
                    job.finished_s = end
                    return
                job.steps += steps
                job.productive_gpu_s += sum(job.running) * (b - start)
            if job.join_at is not None and b == job.join_at:  # the joiners are up: re-form
                job.running = list(job.held)
                job.join_at = None
                pause = self.resize.grow_pause_s if self.resize.grow_pause_s is not None else self.resize.pause_s
                job.busy_until = max(job.busy_until, b + pause + self.resize.transfer_s(job.trace.application))
            a = b

    def _next_completion(self, now: float) -> float:
        """The earliest time a running job would finish (or its joiners come up), for on_events."""
        soonest = math.inf
        for job in self.jobs:
            if job.finished_s is not None or not any(job.running):
                continue
            if job.join_at is not None:
                soonest = min(soonest, job.join_at)
                continue
            start = max(now, job.busy_until)
            soonest = min(soonest, start + (job.target_steps - job.steps) * job.step_time(job.running))
        return soonest

    # -- decisions ------------------------------------------------------------------------------

    def _decide(self, now: float) -> None:
        for job in self.jobs:  # finished jobs give their GPUs back
            if job.finished_s is not None and any(job.held):
                for k, g in enumerate(job.held):
                    self.free[k] += g
                job.held, job.running, job.join_at = [0] * self.cluster.nodes, [0] * self.cluster.nodes, None
        active = [j for j in self.jobs if j.finished_s is None and j.trace.arrival_s <= now]
        if not active:
            return
        grow_pause = self.resize.grow_pause_s if self.resize.grow_pause_s is not None else self.resize.pause_s
        views = tuple(JobView(j.name, j.trace.arrival_s, j.trace.priority, j.trace.requested_gpus,
                              (j.trace.requested_gpus if self.policy_name == "wfs" else j.virtual_nodes)
                              if self.elastic else j.trace.requested_gpus,
                              sum(j.held), j.attained_gpu_s, self.curves.get(j.name, ()),
                              resize_s=grow_pause + self.resize.transfer_s(j.trace.application),
                              remaining_steps=j.target_steps - j.steps)
                      for j in active)
        snapshot = Snapshot(now, self.cluster.gpus, views, resize_s=grow_pause, join_s=self.resize.join_s)
        allocation, self.state = self.policy(snapshot, self.state)
        check_allocation(snapshot, allocation, self.elastic, self.policy_name)
        # Releases first (preemptions, shrinks), then starts and grows in the policy's order.
        for job in active:
            n_old, n_new = sum(job.held), allocation[job.name]
            if n_new < n_old:
                self._change(job, n_new, now)
        for job in active:
            if allocation[job.name] > sum(job.held):
                self._change(job, allocation[job.name], now)
        held = sum(sum(j.held) for j in self.jobs)
        training = sum(sum(j.running) for j in self.jobs if now >= j.busy_until)
        self.timeline.append((now, held, training))

    def _change(self, job: SimJob, count: int, now: float) -> None:
        n_old = sum(job.held)
        flat = self.resize.join_s == 0.0
        if count == 0:  # preempted: stops at once, nothing charged
            for k, g in enumerate(job.held):
                self.free[k] += g
            job.held, job.running, job.join_at = [0] * self.cluster.nodes, [0] * self.cluster.nodes, None
            job.preemptions += 1
            return
        if job.join_at is not None:  # a grow still starting: settle it first (its joiners keep going)
            job.running = list(job.held)
            job.join_at = None
        job.held = place(self.free, job.held, count)
        if n_old == 0:  # a start or resume
            job.running = list(job.held)
            job.busy_until = now + self.resize.start_s
            if job.started_s is None:
                job.started_s = now
            return
        job.resizes += 1
        if count < n_old or flat:
            job.running = list(job.held)
            job.busy_until = max(job.busy_until, now + self.resize.pause_s)  # a start's stall is not cut short
        else:  # grow: the job trains on at its old size while the joiners start
            job.running = [min(r, h) for r, h in zip(job.running, job.held)]
            job.join_at = now + self.resize.join_s

    # -- the run --------------------------------------------------------------------------------

    def run(self, progress: Optional[Callable[[float, int], None]] = None) -> SimResult:
        now = 0.0
        arrivals = sorted({j.trace.arrival_s for j in self.jobs})
        next_arrival = 0
        tick = 0
        while any(j.finished_s is None for j in self.jobs):
            self._decide(now)
            tick += 1
            if progress is not None and tick % 500 == 0:
                progress(now, sum(j.finished_s is not None for j in self.jobs))
            nxt = (math.floor(now / self.interval_s) + 1) * self.interval_s
            if self.on_events:
                while next_arrival < len(arrivals) and arrivals[next_arrival] <= now:
                    next_arrival += 1
                if next_arrival < len(arrivals):
                    nxt = min(nxt, arrivals[next_arrival])
                nxt = min(nxt, max(self._next_completion(now), now + 1e-6))
            for job in self.jobs:
                self._advance(job, now, nxt)
            now = nxt
            if now > 1e8:
                raise RuntimeError(f"policy {self.policy_name!r} left jobs unfinished for 10^8 s of simulated time")
        alone = {j.name: _alone_s(j, self.cluster, self.resize) for j in self.jobs}
        return SimResult(self.policy_name, self.resize.name, self.cluster, self.jobs, alone, self.timeline)


def _virtual_nodes(trace: TraceJob, most: int) -> int:
    """A Pollux job's virtual nodes, as its user would pick them: its requested GPU count doubled
    while the batch and the cluster allow (so the requested count, and its halves and doubles,
    divide them evenly)."""
    v = trace.requested_gpus
    while 2 * v <= most:
        v *= 2
    return v


def _max_gpus(profile: JobProfile, trace: TraceJob) -> int:
    max_gpus = getattr(profile, "max_gpus", None)
    return max_gpus(trace.global_batch) if callable(max_gpus) else trace.requested_gpus


def _alone_s(job: SimJob, cluster: Cluster, resize: ResizeModel) -> float:
    placement = consolidated_placement(job.trace.requested_gpus, cluster.gpus_per_node)
    return resize.start_s + job.target_steps * job.profile.step_time(placement, job.trace.global_batch)


def simulate(jobs: Sequence[TraceJob], policy: str = "vnodes", cluster: Optional[Cluster] = None,
             resize: Optional[ResizeModel] = None, profiles: Optional[Mapping[str, JobProfile]] = None,
             interval_s: float = 60.0, on_events: bool = False,
             progress: Optional[Callable[[float, int], None]] = None) -> SimResult:
    """Run ``policy`` on ``jobs`` (module docstring). Default cluster: 16 nodes x 4 GPUs; default
    resize model: vnodes'."""
    return Simulation(jobs, policy, cluster or Cluster(), resize or vnodes_resize(), profiles, interval_s,
                      on_events).run(progress)
