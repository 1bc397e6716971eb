"""The master stepped one event at a time, with a fake clock; placement as pure functions."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vnodes.scheduler import placement
from vnodes.scheduler.durable import DurableState
from vnodes.scheduler.errors import BadRequest, DuplicateRegistration, StaleEpoch, UnknownWorker
from vnodes.scheduler.master import Decision, JobState, Master, PlanKind, Report, WorkerInfo, WorkerState


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def ok(loss=1.0):
    return Report(ok=True, loss=loss, vnode_losses={}, step_time_s=0.1)


def make(n_vnodes=8, steps=10, workers=2, **kw):
    clock = Clock()
    m = Master(n_vnodes, steps, expected_workers=workers, clock=clock, start_grace_s=5, **kw)
    ids = [m.register(WorkerInfo("")) for _ in range(workers)]
    return m, ids, clock


def commit(m, worker_id, epoch, step, report, timeout_s=5.0):
    """What the servicer does for one member's report: submit, wait for the decision, read it."""
    decided = threading.Event()
    m.submit(worker_id, epoch, step, report, on_decided=decided.set)
    assert decided.wait(timeout_s), f"step {step} of epoch {epoch} undecided after {timeout_s} s"
    return m.outcome(worker_id, epoch, step, want_next=False)


def commit_all(m, ids, epoch, step):
    with ThreadPoolExecutor(len(ids)) as pool:
        return list(pool.map(lambda w: commit(m, w, epoch, step, ok(), timeout_s=5)[0], ids))


@pytest.mark.parametrize("n,m,expected", [(8, 3, [3, 3, 2]), (7, 7, [1] * 7), (64, 5, [13, 13, 13, 13, 12])])
def test_even_placement(n, m, expected):
    assert placement.even(n, m) == expected
    assert placement.ranges(expected)[-1][-1] == n - 1


@pytest.mark.parametrize("throughputs,expected", [
    ([1, 1], [4, 4]), ([2, 1], [5, 3]), ([1, 0], [4, 4]), ([100, 1, 1], [6, 1, 1]), ([3, 1], [6, 2]),
])
def test_throughput_placement(throughputs, expected):
    counts = placement.proportional(8, throughputs)
    assert counts == expected and sum(counts) == 8 and min(counts) >= 1


def test_first_epoch_waits_for_expected_workers_then_runs():
    m, ids, clock = make(workers=2)
    lone_clock = Clock()
    lone = Master(8, 10, expected_workers=2, clock=lone_clock, start_grace_s=5)
    w = lone.register(WorkerInfo(""))
    assert lone.plan(w, 0, timeout_s=0).kind == PlanKind.WAIT
    lone_clock.t = 6  # grace over: start with who is there
    plan = lone.plan(w, 0, timeout_s=0)
    assert plan.kind == PlanKind.RUN and plan.membership.vnodes == (tuple(range(8)),)

    plans = [m.plan(i, 0, timeout_s=0) for i in ids]
    assert plans[0].kind == PlanKind.WAIT  # the second worker is not ready yet
    plans = [m.plan(i, 0, timeout_s=0) for i in ids]
    assert [p.kind for p in plans] == [PlanKind.RUN] * 2
    assert plans[0].membership.vnodes == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert plans[0].membership.sync_source_rank == -1


def test_commit_needs_every_member_and_a_loss_aborts():
    m, ids, clock = make()
    [m.plan(i, 0, timeout_s=0) for i in ids]
    epoch = m.plan(ids[0], 0, timeout_s=0).membership.epoch
    assert commit_all(m, ids, epoch, 0) == [Decision.COMMIT] * 2
    assert m.step == 1 and m.losses == [1.0]
    # Step 1: worker 0 reports, worker 1 dies before reporting -> abort, redo step 1 alone.
    [m.plan(i, 1, timeout_s=0) for i in ids]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(commit, m, ids[0], epoch, 1, ok(), 5)
        m.lost(ids[1], "killed")
        assert pending.result()[0] == Decision.ABORT
    assert m.step == 1
    plan = m.plan(ids[0], 1, timeout_s=0)
    assert plan.kind == PlanKind.RUN and plan.step == 1 and plan.membership.epoch == epoch + 1
    assert plan.membership.members == (ids[0],) and plan.membership.vnodes == (tuple(range(8)),)
    with pytest.raises(StaleEpoch):
        commit(m, ids[0], epoch + 5, 1, ok(), timeout_s=1)


def test_join_waits_for_the_step_boundary_and_gets_state():
    m, ids, clock = make()
    [m.plan(i, 0, timeout_s=0) for i in ids]
    epoch = m.plan(ids[0], 0, timeout_s=0).membership.epoch
    newcomer = m.register(WorkerInfo(""))
    assert m.plan(newcomer, 0, timeout_s=0).kind == PlanKind.WAIT  # step 0 in flight
    assert m.plan(ids[0], 0, timeout_s=0).membership.epoch == epoch
    commit_all(m, ids, epoch, 0)
    plans = {i: m.plan(i, 1 if i in ids else 0, timeout_s=0) for i in ids + [newcomer]}
    p = plans[newcomer]
    assert p.kind == PlanKind.RUN and p.step == 1 and p.membership.epoch == epoch + 1
    assert len(p.membership.members) == 3 and p.membership.sync_source_rank == 0


def test_heartbeat_timeout_declares_a_hung_worker_dead():
    m, ids, clock = make(heartbeat_timeout_s=10)
    [m.plan(i, 0, timeout_s=0) for i in ids]
    clock.t = 5
    m.heartbeat(ids[0])
    clock.t = 12
    m.check_liveness()
    assert m.workers[ids[1]].state == WorkerState.DEAD and m.workers[ids[0]].state == WorkerState.MEMBER


def test_losing_everyone_waits_and_resumes_from_checkpoint():
    m, ids, clock = make(can_resume_from_checkpoint=lambda: 0)
    [m.plan(i, 0, timeout_s=0) for i in ids]
    for i in ids:
        m.lost(i, "node preempted")
    assert m.plan(m.register(WorkerInfo("")), -1, timeout_s=0).kind in (PlanKind.WAIT, PlanKind.RUN)
    assert m.state != JobState.FAILED


def test_bad_events_are_refused_without_corrupting_state():
    m, ids, clock = make()
    with pytest.raises(UnknownWorker):
        m.plan("nobody", 0)
    with pytest.raises(DuplicateRegistration):
        m.register(WorkerInfo(ids[0]))
    [m.plan(i, 0, timeout_s=0) for i in ids]
    epoch = m.membership.epoch
    with pytest.raises(BadRequest):
        commit(m, ids[0], epoch, 7, ok(), timeout_s=1)
    assert commit_all(m, ids, epoch, 0) == [Decision.COMMIT] * 2


def test_nan_fails_the_job_and_stops_everyone():
    m, ids, clock = make()
    [m.plan(i, 0, timeout_s=0) for i in ids]
    m.fail(ids[0], "loss is nan at step 0 on virtual node 3", "NonFiniteLoss")
    assert all(m.plan(i, 0, timeout_s=0).kind == PlanKind.STOP for i in ids)
    assert m.state == JobState.FAILED


@pytest.mark.parametrize("counts,speeds,expected", [
    ([4, 4], [10, 10], None),  # balanced
    ([4, 4], [10, 5], [5, 3]),  # the slow one gives VNs away
    ([4, 4], [10, 9.8], None),  # not worth a re-form
    ([8], [3], None),
])
def test_rebalance_decision(counts, speeds, expected):
    assert placement.rebalance(counts, speeds) == expected


def test_measured_speed_replaces_at_a_boundary():
    m, ids, clock = make(rebalance_every=2)
    [m.plan(i, 0, timeout_s=0) for i in ids]
    epoch = m.membership.epoch
    for step in range(2):
        [m.plan(i, step, timeout_s=0) for i in ids]
        with ThreadPoolExecutor(2) as pool:  # worker 1 takes twice as long for the same 4 VNs
            list(pool.map(lambda a: commit(m, a[0], epoch, step, Report(True, 1.0, {}, a[1]), 5),
                          [(ids[0], 0.1), (ids[1], 0.2)]))
    plan = m.plan(ids[0], 2, timeout_s=0)
    assert plan.membership.epoch == epoch + 1 and plan.membership.sync_source_rank == -1
    assert [len(v) for v in plan.membership.vnodes] == [5, 3]


def test_worker_lost_after_writing_an_unreported_checkpoint_does_not_stall_the_job():
    m, ids, clock = make(workers=1, checkpoint_every=2, can_resume_from_checkpoint=lambda: 2)
    a = ids[0]
    for step in range(2):
        plan = m.plan(a, step, timeout_s=0)
        assert plan.kind == PlanKind.RUN
        commit(m, a, plan.membership.epoch, step, ok(), timeout_s=1)
    assert m.plan(a, 2, timeout_s=0).kind == PlanKind.CHECKPOINT
    m.lost(a, "SIGKILL right after writing step-2")  # the checkpoint exists but was never reported
    b = m.register(WorkerInfo(""))
    plan = m.plan(b, 0, timeout_s=0)
    assert plan.kind == PlanKind.RUN and plan.step == 2 and plan.membership.sync_source_rank == -2


def test_members_silent_after_their_peers_committed_are_declared_lost():
    """After a reduce every member commits within moments; those that stay silent are hung. They are
    declared lost together: one abort, one re-form."""
    m, ids, clock = make(workers=4)
    [m.plan(i, 0, timeout_s=0) for i in ids]  # READY
    plan = [m.plan(i, 0, timeout_s=0) for i in ids][0]
    epoch = plan.membership.epoch
    assert m.expire(epoch, 0, 120.0) == []  # nobody reported yet: nothing to judge
    woken = []
    for i in ids[:2]:
        m.submit(i, epoch, 0, ok(), on_decided=lambda: woken.append(1))
    assert m.expire(epoch + 1, 0, 120.0) == []  # not the current epoch
    assert not m.is_decided(epoch, 0)
    assert m.expire(epoch, 0, 120.0) == ids[2:]
    assert m.is_decided(epoch, 0) and len(woken) == 2
    assert m.outcome(ids[0], epoch, 0, want_next=False)[0] == Decision.ABORT
    assert all(m.workers[i].state == WorkerState.DEAD for i in ids[2:])
    again = m.plan(ids[0], 0, timeout_s=0)
    assert again.kind == PlanKind.RUN and again.step == 0 and set(again.membership.members) == set(ids[:2])
    assert again.membership.epoch == epoch + 1  # one re-form for both losses
    assert m.expire(epoch, 0, 120.0) == []  # decided already


def test_the_committed_history_is_bounded_and_observers_resume_by_count():
    import collections

    m, ids, clock = make(workers=1, steps=10)
    m.committed = collections.deque(maxlen=3)  # COMMITTED_KEPT, made small
    [m.plan(i, 0, timeout_s=0) for i in ids]
    epoch = m.plan(ids[0], 0, timeout_s=0).membership.epoch
    for step in range(5):
        assert commit_all(m, ids, epoch, step) == [Decision.COMMIT]
    assert m.committed_count == 5 and [c.step for c in m.committed] == [2, 3, 4]
    new, seen = m.committed_since(3)
    assert [c.step for c in new] == [3, 4] and seen == 5
    assert m.committed_since(seen) == ([], 5)


def test_a_stale_session_cannot_kill_or_keep_alive_a_new_registration():
    """A worker re-registers under its id while its old session stream is still being torn down."""
    m, ids, clock = make(workers=1, heartbeat_timeout_s=10)
    w = ids[0]
    old = m.heartbeat(w)  # the old session's registration
    m.lost(w, "old session stream broke", old)
    assert m.workers[w].state == WorkerState.DEAD
    info = WorkerInfo("")
    info.worker_id = w
    m.register(info)  # the worker is back under its id
    new = m.heartbeat(w)
    assert new != old
    clock.t = 5.0
    # A late message of the old stream: no sign of life for the new registration, and the stream
    # stays bound to its own (the servicer chains the return value, so must this test).
    assert m.heartbeat(w, old) == old
    assert m.workers[w].last_seen_s == 0.0
    m.lost(w, "old session stream closed", old)  # its teardown, late: not the new registration's death
    assert m.workers[w].state == WorkerState.REGISTERED
    # A late commit of the old stream does not count for the new registration.
    with pytest.raises(BadRequest, match=f"registration {old} of worker {w}.*registered again"):
        m.submit(w, 0, 0, ok(), on_decided=lambda: None, registration=old)
    assert m.reports == {}
    m.heartbeat(w, new)
    assert m.workers[w].last_seen_s == 5.0
    m.lost(w, "new session stream broke", new)
    assert m.workers[w].state == WorkerState.DEAD


def test_a_restarted_master_waits_for_holders_then_resumes_from_the_checkpoint():
    """The grace period for reconnecting holders ends in a re-form, however many plans asked during it
    (regression: the first re-form attempt returned early and nothing tried again)."""
    clock = Clock()
    m = Master(4, 10, start_step=5, losses=[1.0] * 5, restored=True, start_grace_s=5, clock=clock,
               can_resume_from_checkpoint=lambda: 3)
    fresh = m.register(WorkerInfo(""))
    for _ in range(3):  # a fresh worker holds step 0: not the state of step 5
        assert m.plan(fresh, 0, timeout_s=0).kind == PlanKind.WAIT
    clock.t = 6.0  # nobody holding step 5 came back
    plan = m.plan(fresh, 0, timeout_s=0)
    assert plan.kind == PlanKind.RUN and plan.step == 3 and plan.membership.sync_source_rank == -2
    assert m.losses == [1.0] * 3


# -- the end of a job: every worker hears it, across a master restart -----------------------------

def test_a_master_restarted_after_the_end_is_done_and_waits_for_its_previous_workers_to_hear_it():
    """Root cause of a worker's exit code 2 after a restart: the restarted master finished the job with
    the first worker back and stopped serving before the other one re-registered. Now it knows who may
    still run the job (the durable roster) and waits for them, until its start grace period ends."""
    clock = Clock()
    m = Master(4, 10, start_step=10, losses=[1.0] * 10, checkpoint_step=10, awaited=["a", "b", "c"],
               awaited_told=["c"], start_grace_s=5, heartbeat_timeout_s=2, clock=clock)
    assert m.done and m.state == JobState.DONE  # nothing to run: only workers to tell
    assert m.outstanding() == ["a", "b", "c"]
    m.register(WorkerInfo("a", held_step=10))
    assert m.outstanding() == ["a", "b", "c"]  # "a" is back but has not heard the end
    assert m.plan("a", 10, timeout_s=0).kind == PlanKind.STOP
    m.lost("a", "session stream closed", m.workers["a"].joined_order)  # it heard STOP and left
    assert m.outstanding() == ["b", "c"]
    clock.t = 2.0  # "c" was told STOP by the previous master: had its reply been lost, it would be back
    assert m.outstanding() == ["b"]
    clock.t = 4.0
    assert m.outstanding() == ["b"]
    clock.t = 5.0  # the grace period is over: "b" is taken for gone
    assert m.outstanding() == []


def test_an_unfinished_master_is_not_done_and_a_fresh_one_waits_for_nobody():
    restarted = Master(4, 10, start_step=10, losses=[1.0] * 10, checkpoint_step=6, awaited=["a"], restored=True)
    assert not restarted.done  # the final checkpoint is still to be written
    fresh = Master(4, 10, awaited=[])
    assert not fresh.done and fresh.outstanding() == []


def test_the_roster_is_persisted_and_shrinks_as_workers_hear_the_end(tmp_path):
    durable = DurableState(tmp_path, {})
    m, ids, clock = make(n_vnodes=4, steps=1, workers=2, durable=durable)
    a, b = ids
    epoch = [m.plan(i, 0, timeout_s=0) for i in ids][-1].membership.epoch
    commit_all(m, ids, epoch, 0)
    assert durable.load().workers == [a, b]  # at every commit: who may still run the job
    assert m.plan(a, 1, timeout_s=0).kind == PlanKind.CHECKPOINT
    assert m.plan(a, 1, checkpoint_step=1, timeout_s=0).kind == PlanKind.STOP
    assert (durable.load().workers, durable.load().told) == ([a, b], [a])  # a restarted master waits less for a
    assert m.plan(b, 1, timeout_s=0).kind == PlanKind.STOP
    assert m.outstanding() == [a, b] and durable.load().told == [a, b]  # told, but their sessions are still open
    m.lost(a, "session stream closed")
    assert (durable.load().workers, durable.load().told) == ([b], [b]) and m.outstanding() == [b]
    m.lost(b, "session stream closed")
    assert durable.load().workers == [] and m.outstanding() == []
    record = durable.load()
    assert (record.step, record.checkpoint_step) == (1, 1)


def test_a_restarted_master_stops_waiting_for_holders_once_every_previous_worker_is_back():
    """Nobody holds the recorded step (the master died after recording a commit no worker received):
    once both workers of the previous master are back, waiting out the grace period cannot help."""
    clock = Clock()
    m = Master(4, 10, start_step=5, losses=[1.0] * 5, restored=True, start_grace_s=60, clock=clock,
               awaited=["a", "b"], epoch_counter=3)
    m.register(WorkerInfo("a", held_step=4))
    assert m.plan("a", 4, timeout_s=0).kind == PlanKind.WAIT  # "b" may hold step 5
    m.register(WorkerInfo("b", held_step=4))
    plan = m.plan("b", 4, timeout_s=0)
    assert clock.t == 0 and plan.kind == PlanKind.RUN and plan.step == 4  # redo the step no one got
    assert plan.membership.members == ("a", "b") and plan.membership.sync_source_rank == -1


def test_the_checkpoint_is_written_by_a_member_holding_the_state_not_by_rank_0():
    """Root cause of a resumed run that hung at its last step: a worker registered first but asked for
    its first plan after its peer had run the job alone, so it joined at the final checkpoint as rank 0
    without the state; only rank 0 was asked to write it, and everyone waited."""
    clock = Clock()
    m = Master(4, 2, expected_workers=1, clock=clock, start_grace_s=5)
    late, early = m.register(WorkerInfo("")), m.register(WorkerInfo(""))  # ``late`` registered first
    for step in range(2):
        plan = m.plan(early, step, timeout_s=0)
        assert plan.kind == PlanKind.RUN and plan.membership.members == (early,)
        assert commit(m, early, plan.membership.epoch, step, ok())[0] == Decision.COMMIT
    assert m.plan(late, -1, timeout_s=0).kind == PlanKind.WAIT  # joins: rank 0 of the next epoch
    assert m.membership.members == (late, early) and m.membership.sync_source_rank == 1
    plan = m.plan(early, 2, timeout_s=0)
    assert plan.kind == PlanKind.CHECKPOINT and plan.step == 2  # the holder writes it
    assert m.plan(late, -1, timeout_s=0).kind == PlanKind.WAIT
    assert m.plan(early, 2, checkpoint_step=2, timeout_s=0).kind == PlanKind.STOP
    assert m.plan(late, -1, timeout_s=0).kind == PlanKind.STOP and m.state == JobState.DONE


def test_a_step_aborted_at_every_attempt_fails_the_job_at_the_cap_naming_the_last_error():
    m, (a,), clock = make(n_vnodes=4, steps=10, workers=1, max_step_attempts=3)
    failed = Report(ok=False, loss=0.0, vnode_losses={}, step_time_s=0.1, error="RuntimeError: the same bug")
    epoch = m.plan(a, 0, timeout_s=0).membership.epoch
    commit_all(m, [a], epoch, 0)
    for attempt in range(3):
        plan = m.plan(a, 1, timeout_s=0)
        assert plan.kind == PlanKind.RUN and plan.step == 1, attempt
        assert commit(m, a, plan.membership.epoch, 1, failed)[0] == Decision.ABORT
    assert m.state == JobState.FAILED and m.plan(a, 1, timeout_s=0).kind == PlanKind.STOP
    assert "step 1 was aborted 3 times in a row" in m.failure.message
    assert "could not reduce step 1: RuntimeError: the same bug" in m.failure.message


def test_aborts_of_different_steps_do_not_add_up():
    m, (a,), clock = make(n_vnodes=4, steps=10, workers=1, max_step_attempts=2)
    failed = Report(ok=False, loss=0.0, vnode_losses={}, step_time_s=0.1, error="flaky")
    for step in range(3):  # one abort, then a commit, at each step
        plan = m.plan(a, step, timeout_s=0)
        commit(m, a, plan.membership.epoch, step, failed)
        plan = m.plan(a, step, timeout_s=0)
        commit_all(m, [a], plan.membership.epoch, step)
    assert m.state != JobState.FAILED and m.step == 3


def test_the_cap_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    from vnodes.runtime.errors import VnodesError

    monkeypatch.setenv("VNODES_MAX_STEP_ATTEMPTS", "7")
    assert make()[0].max_step_attempts == 7
    monkeypatch.setenv("VNODES_MAX_STEP_ATTEMPTS", "0")
    with pytest.raises(VnodesError, match="VNODES_MAX_STEP_ATTEMPTS='0' must be an integer >= 1"):
        make()
