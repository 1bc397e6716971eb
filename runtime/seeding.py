"""Random streams derived from ``(seed, step, vnode_id)``, never from a worker's history.

A virtual node draws the same dropout masks and augmentations at a step whichever worker runs it and
whatever ran before on that worker. A DDP reference reproduces them by seeding rank ``v`` with
``vnode_seed(seed, step, v)`` before its forward pass.
"""

from __future__ import annotations

import random

import numpy as np
import torch

#: stream names: the model's forward pass, and the loading (augmentation) of the node's batch
MODEL_STREAM = 0
DATA_STREAM = 1


def vnode_seed(seed: int, step: int, vnode_id: int, stream: int = MODEL_STREAM) -> int:
    """A 63-bit seed for one virtual node at one step, well mixed by NumPy's ``SeedSequence``."""
    state = np.random.SeedSequence([seed, step, vnode_id, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_everything(value: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy's and Python's global generators."""
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % (2**32))
