"""Random streams derived from ``(seed, step, vnode_id)``, never from a worker's history.

A virtual node draws the same dropout masks and augmentations at a step whichever worker runs it and
whatever ran before on that worker. A DDP reference reproduces them by seeding rank ``v`` with
``vnode_seed(seed, step, v)`` before its forward pass.
"""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import torch

#: stream names: the model's forward pass, and the loading (augmentation) of the node's batch
MODEL_STREAM = 0
DATA_STREAM = 1
EVAL_STREAM = 2  # the loading of a node's evaluation-pass batches (plugins)
SELECT_STREAM = 3  # a plugin's choice of the rows a node trains on (WorkerHalf.select)


def vnode_seed(seed: int, step: int, vnode_id: int, stream: int = MODEL_STREAM) -> int:
    """A 63-bit seed for one virtual node at one step: a BLAKE2b hash of the four numbers.

    Any change of an input gives an unrelated seed. Computed for every virtual node of every step,
    so it must be cheap: about 1 us (NumPy's ``SeedSequence`` took about 40 us).
    """
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, vnode_id, stream), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_generators(value: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator and ``device``'s generator, as ``torch.manual_seed`` would.

    ``torch.manual_seed`` also visits every accelerator backend, which costs 0.1-0.4 ms per call
    (measured by benchmarks/throughput.py): too much to pay for every virtual node of every step.
    """
    torch.default_generator.manual_seed(value)
    if device is not None and device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(value)


def seed_everything(value: int, device: torch.device | None = None) -> None:
    """Seed torch (CPU and ``device``), NumPy's and Python's global generators."""
    seed_generators(value, device)
    random.seed(value)
    np.random.seed(value % (2**32))
