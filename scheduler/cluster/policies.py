"""Scheduling policies: pure functions from a cluster snapshot to an allocation.

A policy is called as ``policy(snapshot, state) -> (allocation, state)``: ``allocation`` maps each
active job's name to the GPUs it should hold now (0: not running); ``state`` is whatever the policy
remembers between calls (a plain dict, never mutated in place), so that a policy is a pure function
and the same code runs in the simulator (``simulator.py``) and in a live service. Where the GPUs
are (which nodes) is the placer's business (``simulator.place``), not the policy's.

The policies (``POLICIES``):

- ``fifo``: arrival order, each job at exactly its requested GPUs; the queue's head waits until
  it fits, and nothing behind it starts (VirtualFlow's FIFO). Never preempts or resizes.
- ``priority``: the same in order of descending priority, then arrival (VirtualFlow's PRIORITY).
- ``tiresias``: two-dimensional least-attained-service (Gu et al., NSDI 2019) as Pollux's
  simulator runs Tiresias+TunedJobs: two queues, a job moves to the second for good once it has
  attained 16 GPU-hours; each call walks the queues in order and runs each job at exactly its
  requested GPUs if that many are still unclaimed (a later, smaller job may pass a blocked one);
  the others are preempted.
- ``wfs``: VirtualFlow's elastic weighted fair share: shares proportional to priority, in powers of
  two, never above a job's demand (``wfs_shares``).
- ``vnodes``: ours. A vnodes job runs on any number of GPUs up to its virtual nodes with the same
  result, a resize costs a fraction of a second, and its steps are known, so it runs the least
  remaining service first and moves idle GPUs to where they add the most throughput (below).

``vnodes`` in detail. A vnodes job declares its steps, so the policy knows each job's remaining
steps, and its throughput: jobs are ranked by the service they still need at their request
(remaining steps over steps/s, times GPUs: two-dimensional, as Tiresias' attained service is)
divided by priority, least first (``order="srtf"``); jobs that declare no steps follow, as Tiresias
ranks them (two queues, a job moving to the second once its attained service divided by its
priority reaches 16 GPU-hours; arrival order within each); ``order="las"`` ranks every job so.
First, each job in rank order gets ``first_share`` of its request (all of it by default; 0.5 starts
twice as many jobs under contention) if that many GPUs are still unclaimed; then the jobs that
started are topped up to their whole requests in rank order. With ``partial_starts`` (default), no job waits
for a full set: the jobs left out start, in rank order, on what is left. The GPUs still free go one at a time to the job
whose throughput grows most by one more (relative to its current throughput, times ``rank_decay``
per rank), up to its virtual nodes, never past the point where a GPU adds less than ``min_gain`` of
the job's throughput. A running job grows only if the steps it gains over ``horizon_s`` exceed
what the grow costs: the new GPUs' share while they start (``join_s``) and the pause at full size
(``resize_s``: the re-formation and the state transfer); shrinks are never held back,
since the GPUs they free go to other jobs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional

TIRESIAS_THRESHOLD_GPU_S = 16 * 3600.0  # Pollux's Tiresias: the second queue from 16 GPU-hours on


@dataclasses.dataclass(frozen=True)
class JobView:
    """One active job (arrived, not finished), as a policy sees it."""

    name: str
    arrival_s: float
    priority: int
    requested_gpus: int  # what its user asked for (non-elastic policies give exactly this)
    max_gpus: int  # the most GPUs it can use: its virtual nodes
    gpus: int  # GPUs it holds now
    attained_gpu_s: float  # GPU-seconds it has held so far
    throughput: tuple[float, ...] = ()  # steps/s on 1, 2, ..., max_gpus GPUs (consolidated); elastic policies
    resize_s: Optional[float] = None  # the pause a grow costs this job (its state transfer included); None: the snapshot's
    remaining_steps: Optional[float] = None  # steps left to train (a vnodes job declares its steps); None: unknown


@dataclasses.dataclass(frozen=True)
class Snapshot:
    now_s: float
    total_gpus: int
    jobs: tuple[JobView, ...]  # in arrival order
    resize_s: float = 0.0  # the pause one resize costs a job, for policies that weigh it
    join_s: float = 0.0  # how long new GPUs stay useless while the job trains on at its old size


Allocation = dict[str, int]
Policy = Callable[[Snapshot, Mapping], tuple[Allocation, Mapping]]


def _in_order(snapshot: Snapshot, order: list[JobView], skip_blocked: bool) -> Allocation:
    """Each job in ``order`` at exactly its requested GPUs while they fit; ``skip_blocked``: a job
    that does not fit is passed (else everything behind it waits too)."""
    free, out = snapshot.total_gpus, {}
    blocked = False
    for job in order:
        if not blocked and job.requested_gpus <= free:
            out[job.name] = job.requested_gpus
            free -= job.requested_gpus
        else:
            out[job.name] = 0
            blocked = not skip_blocked
    return out


def _non_preemptive(snapshot: Snapshot, order: list[JobView]) -> Allocation:
    """Running jobs keep their GPUs; waiting ones start in ``order`` until the first that does not fit."""
    free = snapshot.total_gpus - sum(j.gpus for j in snapshot.jobs)
    out = {j.name: j.gpus for j in snapshot.jobs}
    for job in order:
        if job.gpus:
            continue
        if job.requested_gpus > free:
            break
        out[job.name] = job.requested_gpus
        free -= job.requested_gpus
    return out


def fifo(snapshot: Snapshot, state: Mapping) -> tuple[Allocation, Mapping]:
    return _non_preemptive(snapshot, sorted(snapshot.jobs, key=lambda j: (j.arrival_s, j.name))), state


def priority(snapshot: Snapshot, state: Mapping) -> tuple[Allocation, Mapping]:
    order = sorted(snapshot.jobs, key=lambda j: (-j.priority, j.arrival_s, j.name))
    return _non_preemptive(snapshot, order), state


def _las_order(snapshot: Snapshot, state: Mapping, threshold_gpu_s: float,
               weigh_priority: bool = False) -> tuple[list[JobView], dict]:
    """Tiresias' two queues: arrival order in the first; a job joins the second's tail when its
    attained service reaches ``threshold_gpu_s`` (divided by its priority when ``weigh_priority``),
    and stays. ``state["demoted"]``: name -> the order of demotion."""
    demoted = dict(state.get("demoted", {}))
    counter = int(state.get("counter", 0))
    for job in snapshot.jobs:
        service = job.attained_gpu_s / (job.priority if weigh_priority else 1)
        if job.name not in demoted and service >= threshold_gpu_s:
            demoted[job.name] = counter
            counter += 1
    active = {j.name for j in snapshot.jobs}
    demoted = {name: k for name, k in demoted.items() if name in active}
    first = [j for j in snapshot.jobs if j.name not in demoted]  # arrival order
    second = sorted((j for j in snapshot.jobs if j.name in demoted), key=lambda j: demoted[j.name])
    return first + second, {"demoted": demoted, "counter": counter}


def tiresias(snapshot: Snapshot, state: Mapping, threshold_gpu_s: float = TIRESIAS_THRESHOLD_GPU_S
             ) -> tuple[Allocation, Mapping]:
    order, state = _las_order(snapshot, state, threshold_gpu_s)
    return _in_order(snapshot, order, skip_blocked=True), state


def _power_of_two_floor(x: float) -> int:
    return 1 << int(math.floor(math.log2(x))) if x >= 1 else 1


def wfs_shares(total_gpus: int, jobs: list[JobView]) -> Allocation:
    """VirtualFlow's weighted fair shares (``get_weighted_fair_shares``) of ``jobs`` (descending
    priority, stable): rounds of share = free x priority / sum of priorities, at least 1, down to a
    power of two, halved in ascending priority while they overflow; a job whose share covers its
    demand gets its demand and leaves the round; then leftover GPUs double allocations in
    descending priority while the demand allows."""
    free = total_gpus
    out: Allocation = {}
    pending = list(jobs)
    while pending and free > 0:
        weight = sum(j.priority for j in pending)
        shares = {j.name: _power_of_two_floor(max(1.0, free * j.priority / weight)) for j in pending}
        for job in sorted(pending, key=lambda j: j.priority):  # ascending priority: halve the least first
            while sum(shares.values()) > free and shares[job.name] > 1:
                shares[job.name] //= 2
        if sum(shares.values()) > free:  # more jobs than GPUs: the lowest priorities get none
            for job in sorted(pending, key=lambda j: j.priority):
                if sum(shares.values()) <= free:
                    break
                shares[job.name] = 0
        satisfied = [j for j in pending if shares[j.name] >= j.requested_gpus]
        if not satisfied:
            for job in pending:
                out[job.name] = shares[job.name]
            free -= sum(shares[j.name] for j in pending)
            pending = []
            break
        for job in satisfied:
            out[job.name] = job.requested_gpus
            free -= job.requested_gpus
        pending = [j for j in pending if j not in satisfied]
    for job in pending:
        out[job.name] = 0
    for job in jobs:  # leftovers: double in descending priority, never past the demand
        while 0 < out[job.name] and 2 * out[job.name] <= job.requested_gpus and out[job.name] <= free:
            free -= out[job.name]
            out[job.name] *= 2
    return out


def wfs(snapshot: Snapshot, state: Mapping) -> tuple[Allocation, Mapping]:
    """Admit queue heads (descending priority) while fewer jobs run than there are GPUs and no
    running job of higher priority would drop below its current share; share out the GPUs."""
    queue = sorted(snapshot.jobs, key=lambda j: (-j.priority, j.arrival_s, j.name))
    running = [j for j in queue if j.gpus > 0]
    admitted = list(running)
    for job in queue:
        if job.gpus > 0:
            continue
        if len(admitted) >= snapshot.total_gpus:
            break
        trial = sorted(admitted + [job], key=lambda j: (-j.priority, j.arrival_s, j.name))
        shares = wfs_shares(snapshot.total_gpus, trial)
        if any(r.priority > job.priority and shares[r.name] < r.gpus for r in running) or shares[job.name] == 0:
            break
        admitted = trial
    shares = wfs_shares(snapshot.total_gpus, sorted(admitted, key=lambda j: (-j.priority, j.arrival_s, j.name)))
    return {j.name: shares.get(j.name, 0) for j in snapshot.jobs}, state


@dataclasses.dataclass(frozen=True)
class VnodesPolicy:
    """Ours (module docstring). Callable as a policy."""

    threshold_gpu_s: float = TIRESIAS_THRESHOLD_GPU_S
    min_gain: float = 0.05  # a GPU must add at least this fraction of the job's throughput
    horizon_s: float = 600.0  # a resize must pay for its pause within this time
    rank_decay: float = 0.5  # each later rank counts this much less when GPUs are shared out
    partial_starts: bool = True  # a job that does not fit whole starts on what is left
    first_share: float = 1.0  # the share of its request each job gets before any job gets all of it
    order: str = "srtf"  # "srtf": least remaining service first where jobs declare their steps; "las": Tiresias'

    def _by_remaining_service(self, order: list[JobView]) -> list[JobView]:
        """Jobs that declare their remaining steps first, by remaining GPU-seconds at their request
        (remaining steps over steps/s, times GPUs) divided by priority; ties and the rest keep ``order``."""
        def key(rank_job):
            rank, job = rank_job
            if job.remaining_steps is None or not job.throughput:
                return (1, 0.0, rank)
            n = max(1, min(job.requested_gpus, job.max_gpus, len(job.throughput)))
            return (0, job.remaining_steps / job.throughput[n - 1] * n / job.priority, rank)
        return [job for _, job in sorted(enumerate(order), key=key)]

    def __call__(self, snapshot: Snapshot, state: Mapping) -> tuple[Allocation, Mapping]:
        order, state = _las_order(snapshot, state, self.threshold_gpu_s, weigh_priority=True)
        if self.order == "srtf":
            order = self._by_remaining_service(order)
        free = snapshot.total_gpus
        want: Allocation = {j.name: 0 for j in order}
        for job in order:  # a share of each request first, for as many jobs as fit (skipping ahead)
            first = min(job.max_gpus, max(1, math.ceil(job.requested_gpus * self.first_share)))
            if first <= free:
                want[job.name] = first
                free -= first
        for job in order:  # then the whole requests, in rank order
            if free == 0:
                break
            if want[job.name]:
                more = min(min(job.requested_gpus, job.max_gpus) - want[job.name], free)
                want[job.name] += max(0, more)
                free -= max(0, more)
        for job in order:  # then no job waits for a full set: the rest start on what is left
            if free == 0 or not self.partial_starts:
                break
            if want[job.name] == 0:
                want[job.name] = min(job.requested_gpus, job.max_gpus, free)
                free -= want[job.name]
        weight = {j.name: self.rank_decay ** min(rank, 60) for rank, j in enumerate(order)}
        while free > 0:
            best, best_gain = None, 0.0
            for job in order:
                n = want[job.name]
                if n == 0 or n >= job.max_gpus or n >= len(job.throughput):
                    continue
                now, more = job.throughput[n - 1], job.throughput[n]
                gain = (more - now) / now if now > 0 else 0.0
                if gain < self.min_gain:
                    continue
                if gain * weight[job.name] > best_gain:
                    best, best_gain = job, gain * weight[job.name]
            if best is None:
                break
            want[best.name] += 1
            free -= 1
        return self._damped(snapshot, want), state

    def _damped(self, snapshot: Snapshot, want: Allocation) -> Allocation:
        """Keep a running job's allocation where a grow would not pay for its pause (keeping uses
        fewer GPUs than wanted, so the allocation stays within the cluster)."""
        out = dict(want)
        for job in snapshot.jobs:  # only grows are damped: a shrink frees GPUs that another job takes
            n_old, n_new = job.gpus, want[job.name]
            if n_old == 0 or n_new <= n_old or n_new > len(job.throughput):
                continue
            old, new = job.throughput[n_old - 1], job.throughput[n_new - 1]
            pause = job.resize_s if job.resize_s is not None else snapshot.resize_s
            gained = (new - old) * self.horizon_s  # steps gained over the horizon
            lost = (new - old) * snapshot.join_s + new * pause  # the joiners' start-up, then the pause
            if gained <= lost:
                out[job.name] = n_old
        return out


vnodes = VnodesPolicy()

POLICIES: dict[str, Policy] = {"fifo": fifo, "priority": priority, "tiresias": tiresias, "wfs": wfs, "vnodes": vnodes}
ELASTIC = frozenset({"wfs", "vnodes"})


def policy_named(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def check_allocation(snapshot: Snapshot, allocation: Allocation, elastic: bool,
                     name: Optional[str] = None) -> None:
    """Raise ``ValueError`` if ``allocation`` is not one a policy may return."""
    who = f"policy {name!r}" if name else "the policy"
    names = {j.name for j in snapshot.jobs}
    if set(allocation) != names:
        raise ValueError(f"{who} allocated {sorted(set(allocation) ^ names)[:5]}..., not exactly the active jobs")
    if sum(allocation.values()) > snapshot.total_gpus:
        raise ValueError(f"{who} allocated {sum(allocation.values())} GPUs of {snapshot.total_gpus}")
    for job in snapshot.jobs:
        n = allocation[job.name]
        if n < 0 or (n and n > job.max_gpus) or (not elastic and n not in (0, job.requested_gpus)):
            raise ValueError(f"{who} gave job {job.name!r} {n} GPUs (requested {job.requested_gpus}, "
                             f"at most {job.max_gpus})")
