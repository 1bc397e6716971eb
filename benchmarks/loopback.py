"""A real master on 127.0.0.1 in this process, and worker processes that register with it, for the
benchmarks that form process groups without a job (the tests have the same in ``tests/loopback.py``)."""

from __future__ import annotations

from vnodes.runtime.master_client import MasterClient, PlanView
from vnodes.scheduler.master import Master
from vnodes.scheduler.rendezvous import RendezvousStore
from vnodes.scheduler.servicer import MasterServer, MasterServicer, serve


def start_master(workers: int) -> tuple[MasterServer, str]:
    """A master for ``workers`` virtual nodes that forms its first epoch once ``workers`` workers
    joined; returns its server (``stop(0)`` it) and address."""
    store = RendezvousStore()
    master = Master(workers, 1000, expected_workers=workers, start_grace_s=300.0,
                    on_epoch_superseded=store.forget_epochs_before)
    server, port = serve(MasterServicer(master, b"", "/tmp", 0, store=store))
    return server, f"127.0.0.1:{port}"


def join(address: str) -> tuple[MasterClient, PlanView]:
    """Register with the master at ``address``; the client and its first RUN plan."""
    client = MasterClient(address)
    client.register(host="localhost", pid=0, device="cpu", device_kind="cpu", memory_bytes=0, throughput=1.0,
                    launch_index=-1)
    while True:
        plan = client.plan(held_step=0, checkpoint_step=-1)
        if plan.kind == "run":
            return client, plan
