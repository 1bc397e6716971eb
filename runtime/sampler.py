"""Which samples virtual node ``v`` reads at global step ``s``: exactly what DDP rank ``v`` reads.

Rank ``v`` of ``DistributedSampler(dataset, num_replicas=N, rank=v, shuffle=True, seed=seed,
drop_last=True)`` with ``set_epoch(epoch)``, cut into batches of ``b`` (the last partial batch of an
epoch dropped, as a ``DataLoader(drop_last=True)`` would), gives the batches of one epoch. Steps run
on across epochs: ``epoch = step // steps_per_epoch``. The sampler position is therefore derived
from the step alone and needs no state of its own in a checkpoint.
"""

from __future__ import annotations

from torch.utils.data.distributed import DistributedSampler

from .errors import InvalidJobSpec


class _Sized:
    """``DistributedSampler`` needs only ``len(dataset)``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class VNodeSampler:
    """Maps ``(step, vnode_id)`` to dataset indices, DDP-identically. Pure; no collectives."""

    def __init__(self, dataset_len: int, virtual_nodes: int, vnode_batch_size: int, seed: int):
        self.dataset_len = dataset_len
        self.virtual_nodes = virtual_nodes
        self.vnode_batch_size = vnode_batch_size
        self.seed = seed
        per_rank = len(self._sampler(0))
        self.steps_per_epoch = per_rank // vnode_batch_size
        if self.steps_per_epoch < 1:
            raise InvalidJobSpec(
                "dataset",
                f"has {dataset_len} samples, fewer than one global batch: virtual_nodes="
                f"{virtual_nodes} x vnode_batch_size={vnode_batch_size} = "
                f"{virtual_nodes * vnode_batch_size} (each virtual node gets {per_rank}). "
                "Use a larger dataset, fewer virtual nodes or a smaller vnode_batch_size.",
            )
        self._epoch: int | None = None
        self._rank_indices: dict[int, list[int]] = {}  # this epoch's order of each node's samples

    def _sampler(self, rank: int) -> DistributedSampler:
        return DistributedSampler(
            _Sized(self.dataset_len), num_replicas=self.virtual_nodes, rank=rank, shuffle=True,
            seed=self.seed, drop_last=True,
        )

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int, vnode_id: int) -> list[int]:
        """The ``vnode_batch_size`` dataset indices virtual node ``vnode_id`` reads at ``step``."""
        if not 0 <= vnode_id < self.virtual_nodes:
            raise ValueError(f"vnode_id {vnode_id} outside [0, {self.virtual_nodes})")
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._rank_indices = epoch, {}
        rank_indices = self._rank_indices.get(vnode_id)
        if rank_indices is None:
            sampler = self._sampler(vnode_id)
            sampler.set_epoch(epoch)
            rank_indices = self._rank_indices[vnode_id] = list(iter(sampler))
        b = self.vnode_batch_size
        return rank_indices[k * b:(k + 1) * b]
