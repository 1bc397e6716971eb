"""The cluster service's decisions, as pure functions: what a policy sees of the live jobs
(``snapshot``), and what must be done to the pool to reach the policy's allocation (``reconcile``).

``service.py`` applies the actions; nothing here touches a process, a clock or a file, so the
decisions are tested table-driven (``tests/test_cluster_service.py``).

Workers move between jobs at step boundaries: a worker taken from a job is *drained* (it finishes
the step it is in, leaves, and its process exits), and only then is its slot free for another
job's new worker. So a move costs one step of the old job at most, plus the new worker's start.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Union

from .policies import JobView, Snapshot
from .registry import JobRecord, SlotRecord

# What a policy is told a resize costs (``Snapshot.join_s``, ``resize_s``): a new worker process
# starts (imports torch, fetches and imports the job, builds the model) in a few seconds on a CPU;
# the job's own pause at the step boundary is a fraction of a second (benchmarks/elastic.py).
WORKER_START_S = 5.0
RESIZE_PAUSE_S = 0.2


@dataclasses.dataclass(frozen=True)
class StartMaster:
    job_id: str


@dataclasses.dataclass(frozen=True)
class Spawn:
    """Start a worker for ``job_id`` in the free ``slot``."""

    job_id: str
    slot: int


@dataclasses.dataclass(frozen=True)
class Drain:
    """Tell the worker in ``slot`` to leave its job at the next step boundary."""

    job_id: str
    slot: int


@dataclasses.dataclass(frozen=True)
class StopMaster:
    """A cancelled job whose workers have all left: end its master."""

    job_id: str


Action = Union[StartMaster, Spawn, Drain, StopMaster]


def _measured(rates: Mapping[str, float], max_workers: int) -> dict[int, float]:
    return {int(n): r for n, r in rates.items() if r > 0 and 1 <= int(n) <= max_workers}


def throughput_curve(rates: Mapping[str, float], max_workers: int, per_worker: float = 1.0) -> tuple[float, ...]:
    """Steps/s on 1..``max_workers`` workers: measured where known, else scaled linearly from the
    nearest measured count (fewer workers first on a tie), else ``per_worker`` steps/s per worker
    (a job not measured yet)."""
    measured = _measured(rates, max_workers)
    curve = []
    for n in range(1, max_workers + 1):
        if n in measured:
            curve.append(measured[n])
        elif measured:
            nearest = min(measured, key=lambda m: (abs(m - n), m))
            curve.append(measured[nearest] * n / nearest)
        else:
            curve.append(per_worker * n)
    return tuple(curve)


def typical_rate(jobs: Sequence[JobRecord]) -> float:
    """Steps/s per worker of the jobs measured so far (the median of each one's best), the guess
    for a job not measured yet: so that a new job is ranked among the others by its remaining
    steps, not by an arbitrary unit. 1.0 when none is measured."""
    per_worker = sorted(max(r / int(n) for n, r in job.rates.items()) for job in jobs
                        if _measured(job.rates, job.virtual_nodes))
    return per_worker[len(per_worker) // 2] if per_worker else 1.0


def live_slots(slots: Sequence[SlotRecord], job_id: str) -> list[SlotRecord]:
    """The job's workers that are not leaving, in slot order."""
    return sorted((s for s in slots if s.job_id == job_id and not s.draining), key=lambda s: s.slot)


def snapshot(jobs: Sequence[JobRecord], slots: Sequence[SlotRecord], now_s: float, pool_size: int) -> Snapshot:
    """What a policy sees: every job that is neither final nor being cancelled, in submission
    order, with ``now_s`` and arrival times in Unix seconds. A job never
    asks for more workers than the pool has or than it has virtual nodes."""
    views, guess = [], typical_rate(jobs)
    for job in jobs:
        if job.state.final or job.cancel_requested or job.step >= job.steps:  # finishing: no more workers
            continue
        most = max(1, min(job.virtual_nodes, pool_size))
        views.append(JobView(name=job.id, arrival_s=job.submitted_at, priority=job.priority,
                             requested_gpus=max(1, min(job.requested_workers, most)), max_gpus=most,
                             gpus=len(live_slots(slots, job.id)), attained_gpu_s=job.attained_worker_s,
                             throughput=throughput_curve(job.rates, most, guess),
                             remaining_steps=float(max(0, job.steps - job.step))))
    return Snapshot(now_s=now_s, total_gpus=pool_size, jobs=tuple(views), resize_s=RESIZE_PAUSE_S,
                    join_s=WORKER_START_S)


def reconcile(jobs: Sequence[JobRecord], slots: Sequence[SlotRecord], allocation: Mapping[str, int],
              masters_up: set[str], pool_size: int) -> list[Action]:
    """The actions that move the pool toward ``allocation`` (job id -> workers; a job it leaves
    out gets none), in the order to apply them:

    1. drains: a job holding more live workers than allocated gives up its highest slots; a job
       whose last step is committed keeps its workers (they hear the end from its master); a
       final job's workers still running are stranded and go (the service kills them);
    2. masters: a job allocated workers whose master is not up gets one started; a cancelled job
       with no worker left (draining ones included) gets its master stopped;
    3. spawns: jobs in ``jobs`` order fill their shortfall from the free slots, lowest first. A slot
       whose worker is still draining is not free yet: the spawn waits for a later call.
    """
    actions: list[Action] = []
    for job in jobs:
        want = 0 if job.state.final or job.cancel_requested else allocation.get(job.id, 0)
        held = live_slots(slots, job.id)
        if job.state.final or job.step < job.steps:  # a finishing job's workers hear the end from its master
            actions += [Drain(job.id, s.slot) for s in held[want:][::-1]]
    for job in jobs:
        if job.state.final:
            continue
        if job.cancel_requested:
            if job.id in masters_up and not any(s.job_id == job.id for s in slots):
                actions.append(StopMaster(job.id))
        elif allocation.get(job.id, 0) > 0 and job.id not in masters_up:
            actions.append(StartMaster(job.id))
    taken = {s.slot for s in slots}
    free = [k for k in range(pool_size) if k not in taken]
    for job in jobs:
        if job.state.final or job.cancel_requested:
            continue
        short = allocation.get(job.id, 0) - len(live_slots(slots, job.id))
        while short > 0 and free:
            actions.append(Spawn(job.id, free.pop(0)))
            short -= 1
    return actions
