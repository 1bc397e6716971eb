"""A real master on 127.0.0.1 in this process (``Master`` + ``MasterServicer`` + gRPC ``serve``), and
workers that register with it for real, for the tests that form process groups without a job.

Spawned processes can import this module (the tests folder is on their path), so a child joins with
``join(address)`` and gets a registered ``MasterClient`` and its first RUN plan.
"""

from __future__ import annotations

import threading
from typing import Optional

from vnodes.protos import PlanKind
from vnodes.runtime.master_client import MasterClient, PlanView
from vnodes.scheduler.master import Master
from vnodes.scheduler.rendezvous import RendezvousStore
from vnodes.scheduler.servicer import MasterServicer, serve


class LoopbackMaster:
    """A master for a job of ``workers`` virtual nodes that waits for ``workers`` workers before
    forming its first epoch. ``stop`` ends the server."""

    def __init__(self, workers: int, steps: int = 1000, token: Optional[str] = None):
        self.store = RendezvousStore()
        self.master = Master(workers, steps, expected_workers=workers, start_grace_s=60.0,
                             on_epoch_superseded=self.store.forget_epochs_before)
        self.servicer = MasterServicer(self.master, b"", "/tmp", 0, store=self.store)
        self.server, port = serve(self.servicer, token=token)
        self.address, self.token = f"127.0.0.1:{port}", token

    def stop(self) -> None:
        self.server.stop(0)

    def supersede(self, worker_id: str) -> None:
        """Declare ``worker_id`` lost: the master forms a new epoch without it."""
        self.master.lost(worker_id, "declared lost by the test")

    def join_all(self, count: int) -> list[tuple[MasterClient, PlanView]]:
        """``count`` registered clients and their plans for the first epoch (in rank order)."""
        joined: list = [None] * count
        threads = [threading.Thread(target=lambda i=i: joined.__setitem__(i, join(self.address, self.token)))
                   for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(joined, key=lambda cp: cp[1].rank_of(cp[0].worker_id))


def join(address: str, token: Optional[str] = None, timeout_s: float = 60.0) -> tuple[MasterClient, PlanView]:
    """Register with the master at ``address`` and wait for a RUN plan (the epoch to form)."""
    client = MasterClient(address, token)
    client.register(host="localhost", pid=0, device="cpu", device_kind="cpu", memory_bytes=0, throughput=1.0,
                    launch_index=-1)
    for _ in range(int(timeout_s / 5) + 1):
        plan = client.plan(held_step=0, checkpoint_step=-1)
        if plan.kind == PlanKind.RUN:
            return client, plan
    raise TimeoutError(f"no RUN plan from {address} within {timeout_s} s")
