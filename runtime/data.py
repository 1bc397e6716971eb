"""Loading each virtual node's batch, optionally prefetched by loader processes.

A batch is identified by ``(step, vnode_id)``; its indices come from ``VNodeSampler`` and its random
stream (augmentation) from ``vnode_seed(seed, step, vnode_id, DATA_STREAM)``, so what a virtual node
reads never depends on which worker or loader process fetched it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from .sampler import VNodeSampler
from .seeding import DATA_STREAM, seed_everything, vnode_seed

BatchKey = tuple[int, int]  # (step, vnode_id)


class _VNodeBatches(Dataset):
    """A dataset whose items are whole virtual-node batches, keyed by ``(step, vnode_id)``."""

    def __init__(self, dataset: Any, sampler: VNodeSampler, seed: int,
                 collate_fn: Optional[Callable[[list], Any]]):
        self.dataset = dataset
        self.sampler = sampler
        self.seed = seed
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:  # not used for iteration; DataLoader asks for it with some samplers
        return 2**62

    def __getitem__(self, key: BatchKey) -> Any:
        step, vnode_id = key
        indices = self.sampler.indices(step, vnode_id)
        seed_everything(vnode_seed(self.seed, step, vnode_id, DATA_STREAM))
        return self.load(indices)

    def load(self, indices: list[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return self.collate_fn(samples)


class BatchLoader:
    """Yields ``(key, batch)`` for a known sequence of keys, in that order.

    With ``loader_workers == 0`` batches load in this process, just in time. Otherwise a
    ``DataLoader`` with spawned processes prefetches them (spawned, not forked: forking a process
    that runs gRPC or CUDA is unsafe).
    """

    def __init__(self, dataset: Any, sampler: VNodeSampler, seed: int,
                 collate_fn: Optional[Callable[[list], Any]] = None, loader_workers: int = 0,
                 pin_memory: bool = False):
        self._batches = _VNodeBatches(dataset, sampler, seed, collate_fn)
        self.dataset = dataset
        self.loader_workers = loader_workers
        self.pin_memory = pin_memory

    def load(self, indices: list[int]) -> Any:
        """The batch of these dataset indices, loaded here (the evaluation pass of plugins)."""
        return self._batches.load(indices)

    def iterate(self, keys: Iterable[BatchKey]) -> Iterator[tuple[BatchKey, Any]]:
        keys = list(keys)
        if self.loader_workers == 0:
            for key in keys:
                yield key, self._batches[key]
            return
        loader = DataLoader(
            self._batches, sampler=keys, batch_size=None, num_workers=self.loader_workers,
            multiprocessing_context="spawn", persistent_workers=False, pin_memory=self.pin_memory,
            prefetch_factor=4,
        )
        yield from zip(keys, loader)


def move_batch(batch: Any, device: torch.device, float_dtype: torch.dtype) -> Any:
    """Move tensors to ``device``; floating-point inputs follow the model's dtype."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point() and batch.dtype != float_dtype:
            batch = batch.to(float_dtype)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(b, device, float_dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, float_dtype) for k, v in batch.items()}
    return batch


def take_rows(batch: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` (int64, along the first dimension) of every tensor in a collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch[rows.to(batch.device)]
    if isinstance(batch, (list, tuple)):
        return type(batch)(take_rows(b, rows) for b in batch)
    if isinstance(batch, dict):
        return {k: take_rows(v, rows) for k, v in batch.items()}
    raise TypeError(f"cannot choose rows of a batch holding a {type(batch).__name__}; a plugin that selects "
                    "samples needs batches of tensors (in tuples, lists or dicts)")
