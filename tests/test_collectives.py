"""The per-epoch process group on a real TCPStore and real gloo: leaving a dead epoch at once."""

import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

from vnodes.runtime.collectives import ABORT_KEY, ARRIVED_KEY, EpochGroup, EpochSuperseded, epoch_prefix


def test_a_member_that_arrives_but_never_connects_does_not_hold_the_survivor():
    """Rank 1 counts itself in, then vanishes before connecting; the master supersedes the epoch
    after 1 s. The survivor leaves then, not after the 30 s group timeout."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    prefix = epoch_prefix("job", 1)
    server.add(prefix + ARRIVED_KEY, 1)  # rank 1 arrived ... and is gone
    timer = threading.Timer(1.0, server.set, args=(prefix + ABORT_KEY, "1"))  # the master moves on
    timer.start()
    group = EpochGroup("127.0.0.1", server.port, torch.device("cpu"), namespace="job", timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(EpochSuperseded, match="connected"):
        group.form(epoch=1, rank=0, world_size=2)
    assert 0.9 < time.monotonic() - t0 < 5.0
    assert group.holds_abandoned  # the connect attempt is still in gloo's constructor: exit with os._exit
    timer.join()


class _Pending:
    """A collective that never completes (a stopped peer's), as gloo's work object reports it."""

    def is_completed(self):
        return False


def test_a_reconnect_keeps_the_abandoned_groups_alive():
    """Dropping a group with a pending collective blocks until it times out, so the object that
    replaces the old one on a reconnect must keep holding it (and the process ends with os._exit)."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    old = EpochGroup("127.0.0.1", server.port, torch.device("cpu"), namespace="job")
    old._abandoned.append((object(), _Pending()))
    new = EpochGroup("127.0.0.1", server.port, torch.device("cpu"), namespace="job")
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


def test_a_collective_finishing_as_the_poll_times_out_is_not_a_failure():
    """The race that failed benchmarks/reduce.py now and then: the poll's 'timed out' must not be
    reported as the collective's failure when the collective in fact completed."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    group = EpochGroup("127.0.0.1", server.port, torch.device("cpu"), namespace="job")
    group.epoch = 1
    group._wait(_FinishesJustAfterThePoll())  # returns: the collective succeeded
    with pytest.raises(RuntimeError, match="closed by peer"):  # a real failure still surfaces
        group._wait(_Fails())
