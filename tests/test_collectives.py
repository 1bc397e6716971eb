"""The per-epoch process group on a real master (loopback gRPC) and real gloo: forming through the
master's store, leaving a dead epoch at once, and riding out a master that cannot be reached."""

import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

from vnodes.protos import epoch_store_prefix
from vnodes.runtime.collectives import EpochGroup, EpochSuperseded
from vnodes.runtime.master_store import MasterStore

from loopback import LoopbackMaster


@pytest.fixture
def master():
    m = LoopbackMaster(workers=2)
    yield m
    m.stop()


def _form_all(joined, timeout_s=30.0):
    """Form the joined clients' epoch in threads; returns the groups (rank order) and any errors."""
    groups = [EpochGroup(client, torch.device("cpu"), timeout_s=timeout_s) for client, _ in joined]
    errors: list = []

    def form(group, plan, worker_id):
        try:
            group.form(plan.membership_epoch, plan.rank_of(worker_id), len(plan.members))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=form, args=(g, plan, client.worker_id))
               for g, (client, plan) in zip(groups, joined)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return groups, errors


def _all_reduce(groups, values):
    tensors = [torch.tensor([float(v)]) for v in values]
    works = [g.pg.allreduce([t]) for g, t in zip(groups, tensors)]
    for g, w in zip(groups, works):
        g._wait(w)
    return [t.item() for t in tensors]


def test_groups_form_through_the_masters_store_and_re_form_in_the_next_epoch():
    """Three workers form epoch 1 on the gRPC store and all-reduce; one is declared lost; the two
    survivors form the next epoch on fresh keys and all-reduce again."""
    m = LoopbackMaster(workers=3)
    try:
        joined = m.join_all(3)
        epoch = joined[0][1].membership_epoch
        groups, errors = _form_all(joined)
        assert errors == []
        assert [g.rank for g in groups] == [0, 1, 2] and {g.epoch for g in groups} == {epoch}
        assert _all_reduce(groups, [1, 2, 4]) == [7.0] * 3
        assert any(k.startswith(epoch_store_prefix(epoch)) for k in m.store._data)  # gloo's address exchange
        m.supersede(joined[2][0].worker_id)
        assert groups[0].client.epoch_status(epoch)[0]  # superseded
        survivors = [(client, client.plan(held_step=0, checkpoint_step=-1)) for client, _ in joined[:2]]
        assert {plan.membership_epoch for _, plan in survivors} == {epoch + 1}
        groups2, errors = _form_all(survivors)
        assert errors == []
        assert _all_reduce(groups2, [10, 20]) == [30.0, 30.0]
    finally:
        m.stop()


def test_a_member_that_never_arrives_does_not_hold_the_survivor(master):
    """Rank 1 joined the epoch but never arrives at its rendezvous; the master declares it lost
    after 1 s. The survivor leaves then, not after the 30 s timeout."""
    (a, plan), (b, _) = master.join_all(2)
    timer = threading.Timer(1.0, master.supersede, args=(b.worker_id,))
    timer.start()
    group = EpochGroup(a, torch.device("cpu"), timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(EpochSuperseded, match="arrived"):
        group.form(plan.membership_epoch, plan.rank_of(a.worker_id), 2)
    assert 0.9 < time.monotonic() - t0 < 5.0
    timer.join()


def test_a_member_that_arrives_but_never_connects_does_not_hold_the_survivor(master):
    """Rank 1 counts itself in, then vanishes before connecting; the master supersedes the epoch
    after 1 s. The survivor leaves then, not after the 30 s group timeout."""
    (a, plan), (b, _) = master.join_all(2)
    epoch = plan.membership_epoch
    assert b.epoch_status(epoch, arrive=True) == (False, 1)  # rank 1 arrived ... and is gone
    timer = threading.Timer(1.0, master.supersede, args=(b.worker_id,))  # the master moves on
    timer.start()
    group = EpochGroup(a, torch.device("cpu"), timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(EpochSuperseded, match="connected"):
        group.form(epoch, plan.rank_of(a.worker_id), 2)
    assert 0.9 < time.monotonic() - t0 < 5.0
    assert group.holds_abandoned  # the connect attempt is still in gloo's constructor: exit with os._exit
    timer.join()


def test_missing_members_time_out_when_the_master_does_not_move_on(master):
    (a, plan), _ = master.join_all(2)
    group = EpochGroup(a, torch.device("cpu"), timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="1 of 2 members missing"):
        group.form(plan.membership_epoch, plan.rank_of(a.worker_id), 2)
    assert 0.9 < time.monotonic() - t0 < 3.0


def test_store_writes_cannot_count_as_arrivals_or_abort_an_epoch(master):
    """What the old TCPStore design read as an arrival or an abort is now an ordinary key: an
    admitted worker that writes such keys neither completes nor ends someone else's rendezvous."""
    (a, plan), (b, _) = master.join_all(2)
    epoch = plan.membership_epoch
    forger = MasterStore(b, timeout_s=5)
    prefix = epoch_store_prefix(epoch)
    for key in ("vnodes-arrived", "vnodes-abort", "arrived", "abort"):
        forger.set(prefix + key, "99")
        forger.add(prefix + key + "-count", 99)
    group = EpochGroup(a, torch.device("cpu"), timeout_s=1.0)
    with pytest.raises(RuntimeError, match="1 of 2 members missing"):  # neither joined nor aborted
        group.form(epoch, plan.rank_of(a.worker_id), 2)


class _Pending:
    """A collective that never completes (a stopped peer's), as gloo's work object reports it."""

    def is_completed(self):
        return False

    def wait(self, timeout=None):
        time.sleep(timeout.total_seconds() if timeout is not None else 0)
        raise RuntimeError("Operation timed out!")


class _CompletesAfter:
    """A collective that completes after ``polls`` polls of the group."""

    def __init__(self, polls):
        self.polls = polls

    def wait(self, timeout=None):
        if self.polls > 0:
            self.polls -= 1
            time.sleep(0.01)
            raise RuntimeError("Operation timed out!")
        return True

    def is_completed(self):
        return self.polls == 0


def test_a_collective_leaves_when_the_master_moves_on(master):
    (a, plan), (b, _) = master.join_all(2)
    group = EpochGroup(a, torch.device("cpu"), timeout_s=30)
    group.epoch = plan.membership_epoch
    threading.Timer(0.5, master.supersede, args=(b.worker_id,)).start()
    t0 = time.monotonic()
    with pytest.raises(EpochSuperseded, match="during a collective"):
        group._wait(_Pending())
    assert time.monotonic() - t0 < 3.0


def test_an_unreachable_master_does_not_break_a_collective_that_completes():
    """The master restarts while a collective is pending: its status calls fail, the collective
    still completes and counts; one that never completes still ends at the group's timeout."""
    m = LoopbackMaster(workers=1)
    (a, plan), = m.join_all(1)
    group = EpochGroup(a, torch.device("cpu"), timeout_s=1.5)
    group.epoch = plan.membership_epoch
    m.stop()  # epoch_status now raises MasterUnavailable
    group._wait(_CompletesAfter(polls=5))  # returns: the collective succeeded
    assert group._pending is None
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not done after"):
        group._wait(_Pending())
    assert 1.4 < time.monotonic() - t0 < 4.0


def test_a_reconnect_keeps_the_abandoned_groups_alive(master):
    """Dropping a group with a pending collective blocks until it times out, so the object that
    replaces the old one on a reconnect must keep holding it (and the process ends with os._exit)."""
    (a, _), _ = master.join_all(2)
    old = EpochGroup(a, torch.device("cpu"))
    old._abandoned.append((object(), _Pending()))
    new = EpochGroup(a, torch.device("cpu"))
    assert not new.holds_abandoned
    new.adopt_abandoned(old)
    assert new.holds_abandoned and not old.holds_abandoned


class _FinishesJustAfterThePoll:
    """A collective that completes (successfully) between the poll's timeout and the check after it."""

    def __init__(self):
        self.completed = False

    def wait(self, timeout=None):
        if timeout is not None and not self.completed:
            self.completed = True  # it finishes right after this poll gives up
            raise RuntimeError("Operation timed out!")
        return True

    def is_completed(self):
        return self.completed


class _Fails:
    def wait(self, timeout=None):
        raise RuntimeError("Connection closed by peer")

    def is_completed(self):
        return True


def test_a_collective_finishing_as_the_poll_times_out_is_not_a_failure(master):
    """The race that failed benchmarks/reduce.py now and then: the poll's 'timed out' must not be
    reported as the collective's failure when the collective in fact completed."""
    (a, plan), _ = master.join_all(2)
    group = EpochGroup(a, torch.device("cpu"))
    group.epoch = plan.membership_epoch
    group._wait(_FinishesJustAfterThePoll())  # returns: the collective succeeded
    with pytest.raises(RuntimeError, match="closed by peer"):  # a real failure still surfaces
        group._wait(_Fails())


def test_the_store_speaks_torchs_store_interface(master):
    """Every operation gloo, NCCL and torch's helpers use, through a PrefixStore as the groups do,
    including torch's own fallbacks (multi_get, multi_set, append, barrier) and its timeout error."""
    (a, plan), (b, _) = master.join_all(2)
    mine, theirs = MasterStore(a, timeout_s=1.0), MasterStore(b, timeout_s=5.0)  # kept: torch holds only C++
    prefix = epoch_store_prefix(plan.membership_epoch)  # only the current epoch's members use its keys
    store, other = dist.PrefixStore(prefix, mine), dist.PrefixStore(prefix, theirs)
    store.set("k", "v")
    assert other.get("k") == b"v" and store.check(["k"]) and not store.check(["k", "absent"])
    assert store.add("n", 3) == 3 and other.add("n", -1) == 2
    assert store.compare_set("k", "v", "w") == b"w" and store.compare_set("k", "x", "y") == b"w"
    assert store.compare_set("fresh", "", "1") == b"1" and store.compare_set("absent", "x", "y") == b"x"
    store.multi_set(["a", "b"], ["1", "2"])
    assert other.multi_get(["a", "b"]) == [b"1", b"2"]
    store.append("a", "3")
    assert other.get("a") == b"13"
    assert store.delete_key("a") and not store.delete_key("a")
    assert store.num_keys() == master.store.num_keys() > 0
    # Blocking reads wake up when another worker (thread) writes, and time out with torch's error.
    threading.Timer(0.3, other.set, args=("late", b"\x00\xff")).start()
    assert store.get("late") == b"\x00\xff"
    store.wait(["late"])
    t0 = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="timeout"):
        store.get("never")
    with pytest.raises(dist.DistStoreError, match="timeout"):
        store.wait(["never"], datetime.timedelta(seconds=0.5))
    assert 1.4 < time.monotonic() - t0 < 4.0
    peer = threading.Thread(target=other.barrier, args=("b", 2))
    peer.start()
    store.barrier("b", 2)
    peer.join(timeout=10)  # both sides pass the barrier (and none is left waiting when the master stops)
    assert not peer.is_alive()


def test_blocking_reads_ask_the_master_again_until_their_own_timeout(master, monkeypatch):
    """The master answers a GET or WAIT within its cap (10 s): a longer wait is several polls."""
    from vnodes.runtime import master_store

    monkeypatch.setattr(master_store, "POLL_S", 0.05)
    (a, plan), (b, _) = master.join_all(2)
    mine, theirs = MasterStore(a, timeout_s=5.0), MasterStore(b)
    k, w = (epoch_store_prefix(plan.membership_epoch) + name for name in ("k", "w"))
    threading.Timer(0.5, theirs.set, args=(k, "v")).start()
    assert mine.get(k) == b"v"
    threading.Timer(0.5, theirs.set, args=(w, "v")).start()
    mine.wait([k, w])
    assert mine.check([w])
