"""The master's side of torch.distributed's rendezvous, without a network: the store's long polls,
its limits, its housekeeping, and the arrival count ``EpochStatus`` answers from."""

import asyncio
import threading
import time

import pytest

from vnodes.protos import epoch_store_prefix
from vnodes.scheduler.errors import StoreFull
from vnodes.scheduler.master import Master, WorkerInfo
from vnodes.scheduler.rendezvous import RendezvousStore


def run(coroutine):
    return asyncio.run(coroutine)


def test_get_and_wait_wake_up_when_a_key_is_set_and_give_up_at_their_timeout():
    async def main():
        store = RendezvousStore()
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, store.set, "a", b"1")
        t0 = loop.time()
        assert await store.get("a", 5.0) == b"1"
        woke_after = loop.time() - t0
        # WAIT needs every key: one of two is not enough.
        loop.call_later(0.1, store.set, "b", b"2")
        loop.call_later(0.3, store.set, "c", b"3")
        t0 = loop.time()
        assert await store.wait(["b", "c"], 5.0) is True
        both_after = loop.time() - t0
        t0 = loop.time()
        assert await store.get("never", 0.3) is None and await store.wait(["a", "never"], 0.2) is False
        gave_up_after = loop.time() - t0
        return woke_after, both_after, gave_up_after

    woke_after, both_after, gave_up_after = run(main())
    assert 0.15 < woke_after < 1.0  # woken by the write, not by the 5 s timeout
    assert 0.25 < both_after < 1.0  # not by the first key alone
    assert 0.45 < gave_up_after < 1.5


def test_add_compare_set_and_delete_follow_torchs_stores():
    async def main():
        store = RendezvousStore()
        assert store.add("n", 2) == 2 and store.add("n", -5) == -3 and store.add("n", 0) == -3
        assert store.compare_set("k", b"", b"v") == b"v"  # absent and expected empty: set
        assert store.compare_set("k", b"x", b"y") == b"v"  # mismatch: the current value
        assert store.compare_set("absent", b"x", b"y") == b"x"  # absent, expected given: expected back
        assert store.check(["k", "n"]) and not store.check(["k", "absent"])
        assert store.delete("k") is True and store.delete("k") is False
        return store.num_keys(), store._bytes

    keys, used = run(main())
    assert keys == 1 and used == len("n") + len(b"-3")


def test_limits_raise_store_full_and_freed_room_is_reusable():
    async def main():
        store = RendezvousStore(max_keys=3, max_bytes=100)
        for k in ("a", "b", "c"):
            store.set(k, b"x")
        store.set("a", b"y" * 10)  # overwriting needs no new key
        with pytest.raises(StoreFull, match="3 keys"):
            store.set("d", b"x")
        store.delete("b")
        store.set("d", b"x")
        with pytest.raises(StoreFull, match="bytes"):
            store.set("a", b"z" * 100)
        assert store._data["a"] == b"y" * 10  # a refused write leaves the old value
        with pytest.raises(StoreFull):
            store.add("e", 1)  # a new key, too many keys
        return store._bytes, sum(len(k) + len(v) for k, v in store._data.items())

    counted, actual = run(main())
    assert counted == actual


def test_forget_epochs_before_from_another_thread_drops_old_epochs_only():
    """The master supersedes epochs from its own threads; the store lives on the server's loop."""
    store = RendezvousStore()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(fn, *args):
        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), loop).result(5)

    try:
        for epoch in (1, 2, 3, 12):
            on_loop(store.set, epoch_store_prefix(epoch) + "/0/0", b"addr")
        on_loop(store.set, "epoch/x/not-an-epoch", b"1")
        on_loop(store.set, "elsewhere", b"1")
        waiter = asyncio.run_coroutine_threadsafe(store.wait([epoch_store_prefix(2) + "/late"], 1.0), loop)
        store.forget_epochs_before(3)  # from this (not the loop's) thread
        deadline = time.monotonic() + 5
        while on_loop(store.num_keys) != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        keys = sorted(on_loop(lambda: list(store._data)))
        assert keys == ["elsewhere", "epoch/12//0/0", "epoch/3//0/0", "epoch/x/not-an-epoch"]
        assert on_loop(lambda: store._bytes) == sum(len(k) + len(v) for k, v in store._data.items())
        assert not waiter.done()  # a waiter on a dropped epoch just times out later
        assert waiter.result(3) is False
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_forget_before_the_loop_is_known_applies_at_the_first_operation():
    store = RendezvousStore()
    store.forget_epochs_before(5)

    async def main():
        store._data[epoch_store_prefix(4) + "/k"] = b"v"  # as if written by an earlier loop
        store._bytes = sum(len(k) + len(v) for k, v in store._data.items())
        store.set(epoch_store_prefix(5) + "/k", b"v")
        return sorted(store._data)

    assert run(main()) == ["epoch/5//k"]


def _master_with_members(count):
    master = Master(count, 10, expected_workers=count, start_grace_s=60)
    ids = [master.register(WorkerInfo(worker_id="", host="h", pid=i, device="cpu", device_kind="cpu",
                                      memory_bytes=0, throughput=1.0, launch_index=i)) for i in range(count)]
    plans = [master.plan(w, held_step=0, timeout_s=0.0) for w in ids]
    plans = [master.plan(w, held_step=0, timeout_s=0.0) for w in ids]
    assert {p.kind.value for p in plans} == {"run"}, plans
    return master, ids, plans[0].membership.epoch


def test_the_master_counts_arrivals_and_says_when_it_moved_on():
    master, (a, b, c), epoch = _master_with_members(3)
    assert master.epoch_status(a, epoch, arrive=True) == (False, 1)
    assert master.epoch_status(a, epoch, arrive=True) == (False, 1)  # idempotent
    assert master.epoch_status(b, epoch, arrive=False) == (False, 1)
    assert master.epoch_status(b, epoch, arrive=True) == (False, 2)
    master.lost(c, "test")
    superseded, _ = master.epoch_status(a, epoch, arrive=True)
    assert superseded


def test_a_poll_about_an_old_epoch_does_not_erase_the_arrivals_at_the_current_one():
    """A member still in the old epoch's collective asks about it while the others arrive at the new
    one: the arrivals counted so far must survive (the worker side re-arrives at every poll, but a
    member that saw everyone arrive stops polling, and the last one would wait for ever)."""
    master, (a, b, c), old = _master_with_members(3)
    master.lost(c, "test")
    new = master.plan(a, held_step=0, timeout_s=0.0).membership.epoch
    assert new == old + 1
    assert master.epoch_status(a, new, arrive=True) == (False, 1)
    assert master.epoch_status(b, old, arrive=False)[0] is True  # b, still in the old collective
    assert master.epoch_status(b, new, arrive=False) == (False, 1)  # a's arrival still counts
    assert master.epoch_status(b, new, arrive=True) == (False, 2)
