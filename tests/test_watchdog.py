"""The hang watchdog on a fake clock; hung and stopped workers as real processes."""

import contextlib
import time

import pytest

from vnodes.runtime.events import Event
from vnodes.runtime.watchdog import Watchdog

from test_master import Clock


def make(timeout_s=5.0):
    clock, fired = Clock(), []
    dog = Watchdog(timeout_s, slack=10.0, clock=clock, on_hang=lambda phase, s: fired.append((phase, s)))
    return dog, clock, fired


def test_waiting_on_peers_or_the_master_never_fires():
    dog, clock, fired = make()
    for phase in (Event.FIT_START, Event.PLAN_REQUESTED, Event.EPOCH_JOIN, Event.REDUCE, Event.REDUCED):
        dog.enter(phase)
        clock.t += 1000.0
        assert not dog.check()
    assert fired == []


def test_a_local_phase_is_judged_only_after_it_completed_once():
    dog, clock, fired = make(timeout_s=5.0)
    dog.enter(Event.STEP_START)
    clock.t += 1000.0  # the first step: compilation, warm-up... never fenced
    assert not dog.check()
    dog.enter(Event.REDUCE)
    dog.enter(Event.CHECKPOINT_START)
    clock.t += 1000.0  # the first checkpoint write: not judged either
    assert not dog.check() and fired == []


def test_a_stuck_local_phase_fires_over_its_budget():
    dog, clock, fired = make(timeout_s=5.0)
    dog.enter(Event.STEP_START)
    clock.t += 0.1
    dog.enter(Event.REDUCE)
    dog.enter(Event.STEP_START)
    clock.t += 4.9
    assert not dog.check()
    clock.t += 0.2
    assert dog.check()
    assert fired[0][0] == "step_start" and fired[0][1] == pytest.approx(5.1)


def test_the_budget_grows_with_the_phase_s_longest_completed_run():
    dog, clock, fired = make(timeout_s=5.0)
    dog.enter(Event.STEP_START)
    clock.t += 3.0  # a legitimately long step
    dog.enter(Event.REDUCE)
    assert dog.budget_s(Event.STEP_START) == pytest.approx(30.0) and dog.budget_s(Event.STEP_COMMITTED) is None
    clock.t += 100.0  # a long wait on peers does not count against the next local phase
    dog.enter(Event.STEP_START)
    clock.t += 20.0
    assert not dog.check()  # 20 s < 10 x 3 s
    clock.t += 11.0
    assert dog.check() and fired[0][0] == "step_start"


def test_bad_timeout_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="leave the watchdog off"):
        Watchdog(0)


def test_bad_environment_value_names_it(monkeypatch):
    from vnodes.runtime.errors import VnodesError
    from vnodes.runtime.watchdog import hang_timeout_from_env

    monkeypatch.setenv("VNODES_HANG_TIMEOUT", "soon")
    with pytest.raises(VnodesError, match="'soon'"):
        hang_timeout_from_env()
    monkeypatch.setenv("VNODES_HANG_TIMEOUT", "0")
    assert hang_timeout_from_env() is None


def test_the_compute_budget_follows_the_nodes_a_worker_runs():
    dog, clock, fired = make(timeout_s=5.0)
    dog.enter(Event.STEP_START, 2)
    clock.t += 4.0  # 2 s per node
    dog.enter(Event.REDUCE)
    assert dog.budget_s(Event.STEP_START, 2) == pytest.approx(40.0)
    dog.enter(Event.STEP_START, 8)  # the peers left: this worker now runs 8 nodes
    clock.t += 100.0  # 4x the work takes 4x as long: healthy
    assert not dog.check()
    clock.t += 61.0  # over 10 x 2 s x 8
    assert dog.check() and fired


# -- real worker processes: worker 1 carries the fault; the result must be a fault-free run's ----------

@pytest.fixture(scope="module")
def reference():
    from vnodes.runtime import train

    from test_elastic import STEPS, f32_spec

    return train(f32_spec(), steps=STEPS)


@contextlib.contextmanager
def two_workers(tmp_path, reference, env, stderr_of_1=None, **master_options):
    """A job on two real worker processes with ``env``; on leaving, both are gone, and the job
    must have ended bitwise equal to a fault-free run."""
    from vnodes.runtime import load_checkpoint
    from vnodes.runtime.checkpoint import check_checkpoint_dir
    from vnodes.scheduler.launcher import spawn_worker, start_master

    from test_elastic import STEPS, assert_bitwise, f32_spec

    handle = start_master(f32_spec(), STEPS, check_checkpoint_dir(tmp_path), expected_workers=2, start_grace_s=60,
                          **master_options)
    procs = [spawn_worker(handle.address, 0, env=env), spawn_worker(handle.address, 1, env=env, stderr=stderr_of_1)]
    try:
        yield handle, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        handle.stop()
    assert_bitwise(load_checkpoint(tmp_path)["model"], reference.model_state_dict)
    assert handle.master.losses == reference.losses


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_hung_worker_fences_itself_and_the_survivors_redo_the_step(tmp_path, reference):
    """Worker 1's main thread blocks forever in step 3's forward while its heartbeat thread lives.
    Its watchdog ends it (exit 3, stacks on stderr); worker 0, blocked in the all-reduce, sees the
    peer gone and redoes step 3 alone."""
    stderr = tmp_path / "hung.stderr"
    with open(stderr, "w") as err, two_workers(tmp_path, reference, {"VNODES_FAULT": "batch_loaded:3:1:hang",
                                                                     "VNODES_HANG_TIMEOUT": "2"}, err) as (handle, procs):
        assert procs[1].wait(timeout=90) == 3
        assert handle.master.wait(lambda m: m.done, timeout_s=120)
        assert procs[0].wait(timeout=30) == 0
    text = stderr.read_text()
    assert "hung after event 'step_start'" in text and "faults.py" in text  # the stack of the stuck thread


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_member_hung_after_the_reduce_is_declared_lost_by_the_master(tmp_path, reference):
    """Worker 1 hangs between its reduce and its commit (a waiting phase: the watchdog does not
    judge it). Its peer committed; after the commit timeout the master declares the silent member
    lost and the peer redoes the step alone."""
    env = {"VNODES_FAULT": "reduced:3:1:hang", "VNODES_HANG_TIMEOUT": "0"}
    with two_workers(tmp_path, reference, env, commit_timeout_s=2.0) as (handle, procs):
        assert handle.master.wait(lambda m: m.done, timeout_s=120)
        assert procs[0].wait(timeout=30) == 0
        assert procs[1].poll() is None  # still hung: nothing waited for it
        by_index = {w.launch_index: w.worker_id for w in handle.master.workers.values()}
        assert handle.master.membership.members == (by_index[0],)  # the job ended without worker 1


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_stopped_member_is_declared_lost_and_its_peer_leaves_the_collective_at_once(tmp_path, reference):
    """Worker 1 is SIGSTOPped just before its all-reduce: its sockets stay open and nothing answers.
    Its heartbeats stop, the master declares it lost, and worker 0 leaves the pending collective as
    soon as the epoch is superseded (not after the group's 60 s timeout); it redoes the step alone."""
    with two_workers(tmp_path, reference, {"VNODES_FAULT": "reduce:3:1:stop"},
                     heartbeat_timeout_s=2.0) as (handle, procs):
        assert handle.master.wait(lambda m: m.step >= 3, timeout_s=90)
        t0 = time.monotonic()
        assert handle.master.wait(lambda m: m.done, timeout_s=120)
        assert time.monotonic() - t0 < 30  # the group timeout is 60 s
        assert procs[0].wait(timeout=30) == 0
        assert procs[1].poll() is None  # still stopped
