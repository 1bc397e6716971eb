"""Per-virtual-node normalisation state, kept mapping-independent.

BatchNorm *batch* statistics are per virtual node for free in sequential execution: each node's
forward pass sees only its own batch. *Running* statistics are shared model buffers, so they follow
one policy (``JobSpec.running_stats``) that does not depend on which worker ran which node:

- ``"mean"``: every virtual node starts the step from the same buffers (restored before each node);
  the step ends with ``sum_v buffers_v / N``. For BatchNorm that is one momentum update with the mean
  of the nodes' batch statistics.
- ``"vnode0"``: the step ends with virtual node 0's buffers (DDP's ``broadcast_buffers=True``).

Each node's contribution ``weight_v * buffers_v`` travels with its gradients through the same
reduction (``reduction.py``), so the policy holds across workers, bitwise in deterministic mode.
Integer buffers (``num_batches_tracked``) advance once per step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


class RunningStats:
    """Snapshot, restore and combine the buffers that a forward pass in training mode mutates."""

    def __init__(self, model: nn.Module, policy: str, virtual_nodes: int):
        self.policy = policy
        self.virtual_nodes = virtual_nodes
        self.float_buffers: list[torch.Tensor] = []
        self.int_buffers: list[torch.Tensor] = []
        self.modules: list[nn.Module] = []  # owners of float_buffers, in order (fused execution)
        seen: set[int] = set()
        for module in model.modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                self.modules.append(module)
                for buf in module.buffers(recurse=False):
                    if buf is not None and id(buf) not in seen:
                        seen.add(id(buf))
                        (self.float_buffers if buf.is_floating_point() else self.int_buffers).append(buf)
        self._snapshot: list[list[torch.Tensor]] = []  # [float buffers, integer buffers]
        self._ints_after: list[torch.Tensor] = []

    @property
    def empty(self) -> bool:
        return not (self.float_buffers or self.int_buffers)

    def weight(self, vnode_id: int) -> float:
        if self.policy == "mean":
            return 1.0 / self.virtual_nodes
        return 1.0 if vnode_id == 0 else 0.0

    def begin_step(self) -> None:
        """Remember the buffers every virtual node of this step starts from."""
        self._snapshot = [[b.detach().clone() for b in self.float_buffers],
                          [b.detach().clone() for b in self.int_buffers]]

    def restore(self) -> None:
        """Put the step's starting buffers back before the next virtual node runs."""
        if self._snapshot:  # one call per dtype kind (foreach kernels group tensors of one dtype)
            if self.float_buffers:
                torch._foreach_copy_(self.float_buffers, self._snapshot[0])
            if self.int_buffers:
                torch._foreach_copy_(self.int_buffers, self._snapshot[1])

    def contribution(self, vnode_id: int) -> list[torch.Tensor]:
        """``weight_v * buffers_v``: this node's share of the step's final float buffers."""
        return list(torch._foreach_mul(self.float_buffers, self.weight(vnode_id))) if self.float_buffers else []

    def accumulate(self, total: list[torch.Tensor], vnode_id: int) -> None:
        """``total += contribution(vnode_id)``, in place (fast mode; a weight of 0 adds nothing)."""
        w = self.weight(vnode_id)
        if self.float_buffers and w != 0.0:
            torch._foreach_add_(total, self.float_buffers, alpha=w)

    def end_compute(self) -> None:
        """Leave the model as the step found it; keep the integer buffers' advance for ``finish_step``.

        Until the step is applied nothing changes, so a step can be recomputed (or redone after a
        lost peer) from the same state.
        """
        self._ints_after = [b.detach().clone() for b in self.int_buffers]
        self.restore()

    def finish_step(self, reduced: list[torch.Tensor]) -> None:
        """Install the reduced float buffers and the integer buffers' one advance per step."""
        if self.float_buffers:
            torch._foreach_copy_(self.float_buffers, reduced)
        if self.int_buffers:
            torch._foreach_copy_(self.int_buffers, self._ints_after)
        self._snapshot = []
