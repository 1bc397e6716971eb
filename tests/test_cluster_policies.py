"""Scheduling policies as pure functions: hand-built snapshots, exact allocations (no simulator)."""

import copy
import dataclasses
import random

import pytest

from vnodes.scheduler.cluster import policies as P
from vnodes.scheduler.cluster.policies import JobView, Snapshot, VnodesPolicy, check_allocation, wfs_shares

T = P.TIRESIAS_THRESHOLD_GPU_S
LINEAR = tuple(float(n) for n in range(1, 17))  # perfect scaling: steps/s on 1..16 GPUs


def job(name, arrival=0.0, req=1, gpus=0, attained=0.0, priority=1, max_gpus=None, throughput=(),
        remaining_steps=None):
    return JobView(name=name, arrival_s=float(arrival), priority=priority, requested_gpus=req,
                   max_gpus=req if max_gpus is None else max_gpus, gpus=gpus, attained_gpu_s=float(attained),
                   throughput=tuple(throughput), remaining_steps=remaining_steps)


def snap(total, *jobs, resize_s=0.0, now=0.0):
    return Snapshot(now_s=now, total_gpus=total, jobs=tuple(jobs), resize_s=resize_s)


def allocate(policy, snapshot, state=None):
    allocation, _ = policy(snapshot, {} if state is None else state)
    return allocation


# ---- fifo and priority: no preemption, no resizing, head-of-line blocking ------------------------

@pytest.mark.parametrize("snapshot,expected", [
    pytest.param(snap(8, job("a", 0, 4), job("b", 1, 8), job("c", 2, 2)), {"a": 4, "b": 0, "c": 0},
                 id="head-of-line: b does not fit, c waits behind it"),
    pytest.param(snap(8, job("a", 0, 4, gpus=4), job("b", 1, 2), job("c", 2, 2)), {"a": 4, "b": 2, "c": 2},
                 id="running job keeps its GPUs, the rest start in order"),
    pytest.param(snap(8, job("a", 5, 8), job("b", 1, 8)), {"a": 0, "b": 8}, id="arrival order, not name order"),
    pytest.param(snap(8, job("b", 3, 8), job("a", 3, 8)), {"a": 8, "b": 0}, id="same arrival: by name"),
    pytest.param(snap(8, job("lo", 0, 8, priority=1), job("hi", 1, 2, priority=10)), {"lo": 8, "hi": 0},
                 id="fifo ignores priority"),
    pytest.param(snap(4, job("a", 0, 4, gpus=4), job("b", 1, 1)), {"a": 4, "b": 0},
                 id="full cluster: nothing starts, nothing is preempted"),
])
def test_fifo(snapshot, expected):
    assert allocate(P.fifo, snapshot) == expected


@pytest.mark.parametrize("snapshot,expected", [
    pytest.param(snap(8, job("a", 0, 4, priority=1), job("b", 1, 8, priority=10), job("c", 2, 2, priority=5)),
                 {"a": 0, "b": 8, "c": 0}, id="descending priority; the cluster is full after b"),
    pytest.param(snap(8, job("a", 0, 4, gpus=4, priority=1), job("b", 1, 8, priority=10),
                      job("c", 2, 2, priority=5)),
                 {"a": 4, "b": 0, "c": 0}, id="never preempts: b waits for a, and c waits behind b"),
    pytest.param(snap(8, job("a", 0, 4, priority=5), job("b", 1, 4, priority=5), job("c", 2, 4, priority=1)),
                 {"a": 4, "b": 4, "c": 0}, id="equal priority: arrival order"),
    pytest.param(snap(8, job("a", 0, 2, priority=1), job("b", 1, 2, priority=10)), {"a": 2, "b": 2},
                 id="both fit"),
])
def test_priority(snapshot, expected):
    assert allocate(P.priority, snapshot) == expected


# ---- tiresias: two queues, skip-ahead, demotion at 16 GPU-hours ---------------------------------

@pytest.mark.parametrize("snapshot,state,expected", [
    pytest.param(snap(8, job("a", 0, 4), job("b", 1, 8), job("c", 2, 4)), {}, {"a": 4, "b": 0, "c": 4},
                 id="skip-ahead: c passes the blocked b"),
    pytest.param(snap(8, job("a", 0, 8, gpus=8, attained=T), job("b", 1, 4)), {}, {"a": 0, "b": 4},
                 id="a at the threshold is demoted behind b and preempted"),
    pytest.param(snap(8, job("a", 0, 8, gpus=8, attained=T - 1), job("b", 1, 4)), {}, {"a": 8, "b": 0},
                 id="one GPU-second short of the threshold: a stays first"),
    pytest.param(snap(8, job("a", 0, 8, gpus=8, attained=T, priority=2), job("b", 1, 4)), {},
                 {"a": 0, "b": 4}, id="priority does not weigh attained service"),
    pytest.param(snap(8, job("a", 0, 4, gpus=4), job("b", 1, 4, gpus=4), job("c", 2, 4)),
                 {"demoted": {"a": 0}, "counter": 1}, {"a": 0, "b": 4, "c": 4},
                 id="demoted in an earlier call: stays in the second queue"),
    pytest.param(snap(8, job("b", 0, 8), job("a", 1, 8)), {"demoted": {"a": 0, "b": 1}, "counter": 2},
                 {"a": 8, "b": 0}, id="second queue in demotion order, not arrival order"),
])
def test_tiresias(snapshot, state, expected):
    assert allocate(P.tiresias, snapshot, state) == expected


def test_tiresias_carries_demotions_between_calls():
    """b arrived first; a is demoted in the first call, b in the second: a leads the second queue."""
    first = snap(8, job("b", 0, 8, gpus=8, attained=0), job("a", 1, 8, attained=T))
    allocation, state = P.tiresias(first, {})
    assert allocation == {"a": 0, "b": 8}
    assert state == {"demoted": {"a": 0}, "counter": 1}
    second = snap(8, job("b", 0, 8, gpus=8, attained=T), job("a", 1, 8, attained=T))
    allocation, state = P.tiresias(second, state)
    assert allocation == {"a": 8, "b": 0}
    assert state == {"demoted": {"a": 0, "b": 1}, "counter": 2}
    # Without the first call's memory both reach the threshold at once and arrival order decides.
    assert allocate(P.tiresias, second, {}) == {"a": 0, "b": 8}


def test_tiresias_forgets_finished_jobs():
    _, state = P.tiresias(snap(8, job("a", 0, 4)), {"demoted": {"gone": 0}, "counter": 1})
    assert state == {"demoted": {}, "counter": 1}


# ---- wfs: VirtualFlow's weighted fair shares ------------------------------------------------------

def wfs_job(name, priority, demand, arrival=0.0, gpus=0):
    return job(name, arrival, demand, gpus=gpus, priority=priority)


@pytest.mark.parametrize("total,jobs,expected", [
    pytest.param(8, [("a", 1, 8), ("b", 1, 8), ("c", 1, 8)], {"a": 4, "b": 2, "c": 2},
                 id="8/3 rounds down to 2 each; the 2 left double the first job"),
    pytest.param(8, [("h", 10, 8), ("m", 5, 8), ("l", 1, 8)], {"h": 4, "m": 2, "l": 2},
                 id="shares 4, 2, 1 by weight; 1 left: only l's 1 can double"),
    pytest.param(16, [("a", 16, 16), ("b", 8, 16)] + [(f"z{i}", 1, 16) for i in range(8)],
                 {"a": 4, "b": 4, **{f"z{i}": 1 for i in range(8)}},
                 id="overflow 20 > 16: b halved to 1 before a is halved; leftover 3 doubles b twice"),
    pytest.param(8, [("a", 1, 2), ("b", 1, 8)], {"a": 2, "b": 4},
                 id="demand cap: a leaves with 2; b's next round gets 4; 2 left, b cannot double"),
    pytest.param(8, [("a", 1, 2), ("b", 1, 4)], {"a": 2, "b": 4}, id="every demand met: 2 GPUs idle"),
    pytest.param(4, [("a", 1, 8)], {"a": 4}, id="a lone job: the whole cluster, below its demand"),
    pytest.param(2, [("h", 10, 4), ("m", 5, 4), ("l", 1, 4)], {"h": 1, "m": 1, "l": 0},
                 id="more jobs than GPUs: the lowest priority gets none"),
])
def test_wfs_shares(total, jobs, expected):
    views = [wfs_job(n, p, d) for n, p, d in jobs]  # callers pass descending priority (stable)
    assert wfs_shares(total, views) == expected


@pytest.mark.parametrize("snapshot,expected", [
    pytest.param(snap(8, wfs_job("hi", 10, 8, gpus=8), wfs_job("lo", 1, 8, arrival=1)), {"hi": 8, "lo": 0},
                 id="not admitted: the running higher-priority job would drop below its 8"),
    pytest.param(snap(8, wfs_job("lo", 1, 8, gpus=8), wfs_job("hi", 10, 8, arrival=1)), {"hi": 4, "lo": 4},
                 id="admitted: lo is shrunk to make room for a higher priority"),
    pytest.param(snap(2, *(wfs_job(f"j{i}", 1, 1, arrival=i) for i in range(3))), {"j0": 1, "j1": 1, "j2": 0},
                 id="no more jobs than GPUs"),
    pytest.param(snap(8, wfs_job("a", 1, 4, gpus=4), wfs_job("b", 1, 4, arrival=1)), {"a": 4, "b": 4},
                 id="equal priority, both demands fit"),
])
def test_wfs(snapshot, expected):
    assert allocate(P.wfs, snapshot) == expected


# ---- vnodes: whole requests in LAS order, partial starts, extra GPUs by marginal gain -----------

SATURATED = (1.0, 2.0, 2.05, 2.06)  # the third GPU adds 2.5% < min_gain
HALTING = (1.0, 2.0, 2.1, 2.2)  # the third GPU adds exactly 5%, the fourth less


WHOLE = VnodesPolicy(first_share=1.0, order="las", partial_starts=True)  # Tiresias' order, whole requests first, then partial starts and extras


def vjob(name, arrival, req, max_gpus=8, throughput=LINEAR, **kw):
    return job(name, arrival, req, max_gpus=max_gpus, throughput=throughput[:max_gpus], **kw)


@pytest.mark.parametrize("snapshot,expected", [
    pytest.param(snap(8, vjob("a", 0, 4), vjob("b", 1, 4), vjob("c", 2, 4)), {"a": 4, "b": 4, "c": 0},
                 id="whole requests in arrival order fill the cluster"),
    pytest.param(snap(8, vjob("a", 0, 4, gpus=4, attained=T), vjob("b", 1, 4, gpus=4), vjob("c", 2, 4)),
                 {"a": 0, "b": 4, "c": 4}, id="LAS: demoted a yields to c"),
    pytest.param(snap(8, vjob("a", 0, 4, gpus=4, attained=2 * T, priority=2), vjob("b", 1, 4, gpus=4),
                      vjob("c", 2, 4)),
                 {"a": 0, "b": 4, "c": 4}, id="attained / priority reaches 16 GPU-h: demoted"),
    pytest.param(snap(8, vjob("a", 0, 4, gpus=4, attained=2 * T - 1, priority=2), vjob("b", 1, 4, gpus=4),
                      vjob("c", 2, 4)),
                 {"a": 4, "b": 4, "c": 0}, id="just below the weighted threshold (tiresias would demote)"),
    pytest.param(snap(8, vjob("a", 0, 6, max_gpus=6), vjob("b", 1, 4, max_gpus=4)), {"a": 6, "b": 2},
                 id="partial start: b starts on the 2 left"),
    pytest.param(snap(8, vjob("a", 0, 6, max_gpus=6), vjob("b", 1, 8, max_gpus=8), vjob("c", 2, 1, max_gpus=1)),
                 {"a": 6, "b": 1, "c": 1}, id="skip-ahead before partial starts: c whole, then b on the 1 left"),
    pytest.param(snap(8, vjob("a", 0, 2), vjob("b", 1, 2, throughput=SATURATED, max_gpus=4)),
                 {"a": 6, "b": 2}, id="extra GPUs go where they add throughput; b is saturated"),
    pytest.param(snap(8, vjob("a", 0, 2, max_gpus=4), vjob("b", 1, 2, throughput=SATURATED, max_gpus=4)),
                 {"a": 4, "b": 2}, id="max_gpus caps a; b gains too little: 2 GPUs stay idle"),
    pytest.param(snap(4, vjob("a", 0, 1, max_gpus=4, throughput=(1.0, 1.1, 1.15, 1.2)), vjob("b", 1, 1)),
                 {"a": 1, "b": 3}, id="marginal gain beats rank: b's 50% x 0.5 over a's 10%"),
    pytest.param(snap(8, vjob("a", 0, 2), vjob("b", 1, 2)), {"a": 5, "b": 3},
                 id="linear pair: gain x 0.5 per rank, ties to the earlier rank"),
    pytest.param(snap(8, vjob("a", 0, 2, max_gpus=2)), {"a": 2}, id="a job never exceeds its max_gpus"),
])
def test_vnodes_whole_requests_first(snapshot, expected):
    allocation = allocate(WHOLE, snapshot)
    assert allocation == expected
    check_allocation(snapshot, allocation, elastic=True, name="vnodes")


@pytest.mark.parametrize("gpus,resize_s,expected", [
    pytest.param(2, 0.0, 3, id="resize free: grows to 3 (the 4th adds < 5%)"),
    pytest.param(2, 20.0, 3, id="gains 0.1 x 600 = 60 steps > 2.1 x 20 = 42 lost: grows"),
    pytest.param(2, 30.0, 2, id="gains 60 steps <= 2.1 x 30 = 63 lost: stays at 2"),
    pytest.param(0, 30.0, 3, id="a start is never held back"),
    pytest.param(4, 30.0, 3, id="a shrink is never held back"),
])
def test_vnodes_grows_only_when_it_pays_within_the_horizon(gpus, resize_s, expected):
    snapshot = snap(4, vjob("a", 0, 2, max_gpus=4, throughput=HALTING, gpus=gpus), resize_s=resize_s)
    assert P.vnodes.horizon_s == 600.0 and P.vnodes.min_gain == 0.05
    assert allocate(P.vnodes, snapshot) == {"a": expected}
    assert allocate(WHOLE, snapshot) == {"a": expected}


def test_vnodes_without_partial_starts_waits_for_a_whole_request():
    snapshot = snap(8, vjob("a", 0, 6, max_gpus=6), vjob("b", 1, 4, max_gpus=4))
    assert allocate(VnodesPolicy(partial_starts=False, first_share=1.0), snapshot) == {"a": 6, "b": 0}


@pytest.mark.parametrize("snapshot,expected", [
    pytest.param(snap(8, vjob("a", 0, 4), vjob("b", 1, 4), vjob("c", 2, 4)), {"a": 4, "b": 2, "c": 2},
                 id="half of each request first: all three start, a is topped up first"),
    pytest.param(snap(8, vjob("a", 0, 8), vjob("b", 1, 8)), {"a": 4, "b": 4},
                 id="two big requests share the cluster instead of one waiting"),
    pytest.param(snap(8, vjob("a", 0, 3, max_gpus=3), vjob("b", 1, 1, max_gpus=1)), {"a": 3, "b": 1},
                 id="a share rounds up; room for all: whole requests"),
    pytest.param(snap(4, vjob("a", 0, 2), vjob("b", 1, 2), vjob("c", 2, 2), vjob("d", 3, 2), vjob("e", 4, 2)),
                 {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0}, id="one GPU each in rank order, the rest wait"),
])
def test_vnodes_first_share_half_shares_requests_under_contention(snapshot, expected):
    allocation = allocate(VnodesPolicy(first_share=0.5, partial_starts=True), snapshot)
    assert allocation == expected
    check_allocation(snapshot, allocation, elastic=True, name="vnodes")


@pytest.mark.parametrize("snapshot,expected", [
    pytest.param(snap(8, vjob("a", 0, 4, remaining_steps=1000), vjob("b", 1, 4, remaining_steps=10),
                      vjob("c", 2, 4, remaining_steps=100)), {"a": 0, "b": 4, "c": 4},
                 id="least remaining service first: the oldest, longest job waits"),
    pytest.param(snap(8, vjob("a", 0, 8, remaining_steps=100, throughput=LINEAR[:8]),
                      vjob("b", 1, 2, remaining_steps=60, throughput=(0.1, 0.2))), {"a": 8, "b": 0},
                 id="remaining GPU-seconds, not steps: a needs 100/8 x 8, b 60/0.2 x 2"),
    pytest.param(snap(8, vjob("a", 0, 8, remaining_steps=100), vjob("b", 1, 1, remaining_steps=20)),
                 {"a": 7, "b": 1}, id="two-dimensional: b's 20 GPU-s before a's 100; a starts on the 7 left"),
    pytest.param(snap(4, vjob("a", 0, 4, remaining_steps=100), vjob("b", 1, 4, remaining_steps=300, priority=5)),
                 {"a": 0, "b": 4}, id="divided by priority: b's 300/5 beats a's 100"),
    pytest.param(snap(4, vjob("a", 0, 4), vjob("b", 1, 4, remaining_steps=300)), {"a": 0, "b": 4},
                 id="a job that declares its steps goes before one that does not"),
])
def test_vnodes_default_runs_the_least_remaining_service_first(snapshot, expected):
    assert (P.vnodes.order, P.vnodes.first_share, P.vnodes.partial_starts) == ("srtf", 1.0, True)
    allocation = allocate(P.vnodes, snapshot)
    assert allocation == expected
    check_allocation(snapshot, allocation, elastic=True, name="vnodes")


def random_snapshot(rng: random.Random, policy: str) -> Snapshot:
    total = rng.choice([1, 2, 4, 8, 16, 64])
    jobs = []
    for i in range(rng.randint(1, 12)):
        req = rng.choice([1, 2, 4, 8])
        if req > total:
            req = total
        elastic_max = min(total, req * rng.choice([1, 2, 4]))
        max_gpus = elastic_max if policy == "vnodes" else req
        curve = tuple(sorted(rng.uniform(0.5, 8.0) for _ in range(max_gpus)))
        jobs.append(job(f"j{i}", rng.uniform(0, 1000), req, max_gpus=max_gpus, attained=rng.choice([0.0, 2 * T]),
                        priority=rng.choice([1, 5, 10]), throughput=curve))
    held, free = [], total
    for j in jobs:  # a consistent "now": some running at their request
        if rng.random() < 0.5 and j.requested_gpus <= free:
            held.append(dataclasses.replace(j, gpus=j.requested_gpus))
            free -= j.requested_gpus
        else:
            held.append(j)
    return snap(total, *sorted(held, key=lambda j: j.arrival_s), resize_s=rng.choice([0.0, 30.0]))


@pytest.mark.parametrize("name", list(P.POLICIES))
def test_every_policy_returns_a_valid_allocation(name):
    """Never more GPUs than the cluster, never past a job's max_gpus, exactly the active jobs."""
    rng = random.Random(name)
    policy, state = P.POLICIES[name], {}
    for _ in range(200):
        snapshot = random_snapshot(rng, name)
        allocation, state = policy(snapshot, state)
        check_allocation(snapshot, allocation, elastic=name in P.ELASTIC, name=name)
        assert sum(allocation.values()) <= snapshot.total_gpus


@pytest.mark.parametrize("name", list(P.POLICIES))
def test_every_policy_is_pure(name):
    """Same snapshot and state: same result; the state passed in is not mutated."""
    rng = random.Random(f"pure-{name}")
    policy = P.POLICIES[name]
    for _ in range(20):
        snapshot = random_snapshot(rng, name)
        state = {"demoted": {snapshot.jobs[0].name: 0}, "counter": 1}
        before = copy.deepcopy(state)
        first = policy(snapshot, state)
        assert state == before
        second = policy(snapshot, state)
        assert first == second
        assert state == before


# ---- check_allocation ------------------------------------------------------------------------------

CHECKED = snap(8, job("a", 0, 4, max_gpus=8), job("b", 1, 2, max_gpus=2))


@pytest.mark.parametrize("allocation,elastic,words", [
    pytest.param({"a": 4}, False, "not exactly the active jobs", id="a job left out"),
    pytest.param({"a": 4, "b": 2, "ghost": 0}, False, "not exactly the active jobs", id="an unknown job"),
    pytest.param({"a": 8, "b": 2}, True, "allocated 10 GPUs of 8", id="more than the cluster"),
    pytest.param({"a": -1, "b": 2}, True, "gave job 'a' -1 GPUs", id="negative"),
    pytest.param({"a": 4, "b": 3}, True, "gave job 'b' 3 GPUs", id="past max_gpus"),
    pytest.param({"a": 2, "b": 2}, False, "gave job 'a' 2 GPUs", id="non-elastic: only 0 or the request"),
])
def test_check_allocation_rejects(allocation, elastic, words):
    with pytest.raises(ValueError, match=words):
        check_allocation(CHECKED, allocation, elastic=elastic, name="p")


@pytest.mark.parametrize("allocation,elastic", [
    ({"a": 4, "b": 2}, False), ({"a": 0, "b": 0}, False), ({"a": 6, "b": 1}, True), ({"a": 0, "b": 2}, True),
])
def test_check_allocation_accepts(allocation, elastic):
    check_allocation(CHECKED, allocation, elastic=elastic)


def test_policy_named():
    assert P.policy_named("tiresias") is P.tiresias
    with pytest.raises(ValueError, match="unknown policy 'sjf'; choose one of fifo, priority"):
        P.policy_named("sjf")
