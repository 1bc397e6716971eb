"""The gradient path: a torch.distributed process group per membership epoch.

The master hosts one long-lived ``TCPStore``; epoch ``e`` rendezvouses under the key prefix
``<namespace>/epoch/e/``, so re-forming a group takes milliseconds and a stale member of an old epoch
can never join a new one. The namespace is a per-job secret that the master hands only to workers
it admitted (token), so a stranger who reaches the store's port cannot find or join a rendezvous. Gradients travel here (gloo on CPU, NCCL on GPU), never over gRPC.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .engine import StepPartial
from .reduction import Block, Payload, canonical_sum


ARRIVED_KEY = "vnodes-arrived"
ABORT_KEY = "vnodes-abort"  # set by the master when it moves on from an epoch


def epoch_prefix(namespace: str, epoch: int) -> str:
    """Where epoch ``epoch`` of the job with store namespace ``namespace`` rendezvouses."""
    return f"{namespace}/epoch/{epoch}/"


class EpochSuperseded(RuntimeError):
    """The master formed a newer epoch while this one was still gathering its members."""


class EpochGroup:
    """This worker's membership in the current epoch's process group."""

    def __init__(self, store_host: str, store_port: int, device: torch.device, namespace: str,
                 timeout_s: float = 60.0):
        self.namespace = namespace
        self.store = dist.TCPStore(store_host, store_port, is_master=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.epoch: Optional[int] = None
        self.rank = -1
        self.world_size = 0

    def form(self, epoch: int, rank: int, world_size: int) -> None:
        """Leave the previous epoch's group and join epoch ``epoch``'s.

        Raises:
            RuntimeError: a peer did not arrive within the timeout.
        """
        self.destroy()
        prefix = epoch_prefix(self.namespace, epoch)
        # Gather every member first, polling the master's abort key: a member that died before
        # arriving must not hold the survivors for the whole store timeout.
        self.store.add(prefix + ARRIVED_KEY, 1)
        deadline = time.monotonic() + self.timeout.total_seconds()
        while self.store.add(prefix + ARRIVED_KEY, 0) < world_size:
            if self.store.check([prefix + ABORT_KEY]):
                raise EpochSuperseded(f"epoch {epoch} was superseded before all {world_size} members arrived")
            if time.monotonic() > deadline:
                raise RuntimeError(f"epoch {epoch}: members missing after {self.timeout.total_seconds():.0f} s")
            time.sleep(0.02)
        store = dist.PrefixStore(prefix, self.store)
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size, timeout=self.timeout)
        self.epoch, self.rank, self.world_size = epoch, rank, world_size

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.epoch = None

    def broadcast_state(self, state: Optional[dict[str, Any]], source_rank: int) -> dict[str, Any]:
        """Send ``state`` from ``source_rank`` to every member; returns it everywhere."""
        box = [state if self.rank == source_rank else None]
        dist.broadcast_object_list(box, src=source_rank, device=self._object_device())
        return box[0]

    def reduce(self, partial: StepPartial, deterministic: bool) -> tuple[Payload, list[bool]]:
        """Sum every member's partial: one all-reduce per dtype (fast), or canonical (deterministic).

        Raises:
            RuntimeError: a peer vanished (the caller reports the step as not reduced).
        """
        if deterministic:
            local = ([(b.start, b.size, [t.cpu() for t in b.payload]) for b in partial.blocks], partial.used)
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, local)  # NCCL: uses the current device (set by the agent)
            blocks = [Block(start, size, [t.to(self.device) for t in payload])
                      for worker_blocks, _ in gathered for start, size, payload in worker_blocks]
            used = [any(flags) for flags in zip(*(u for _, u in gathered))]
            return canonical_sum(blocks), used
        payload = list(partial.payload)
        used = torch.tensor([float(u) for u in partial.used], device=self.device)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(payload):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = _flatten_dense_tensors([payload[i] for i in indices])
            dist.all_reduce(flat)
            for i, t in zip(indices, _unflatten_dense_tensors(flat, [payload[i] for i in indices])):
                payload[i].copy_(t)
        dist.all_reduce(used)
        return payload, [bool(u > 0) for u in used.tolist()]

    def _object_device(self) -> Optional[torch.device]:
        return self.device if self.backend == "nccl" else None
