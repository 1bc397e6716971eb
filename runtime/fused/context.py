"""What the engine tells the patched modules about the group running now."""

from __future__ import annotations

from typing import Optional

import torch


class FusionContext:
    """Per-group settings the patched modules read: segment count, weights, generators, sums."""

    def __init__(self):
        self.groups = 0  # 0: not fused (modules behave as usual)
        self.rows = 0  # samples in the group: groups * the nodes' batch size
        self.batch_dim: Optional[int] = None  # set while a transformer layer runs: where its batch is
        self.in_backward = False  # a patched module called now is being recomputed (activation checkpointing)
        self.weights: Optional[torch.Tensor] = None  # per segment: the running-stats policy weight
        self.generators: list[torch.Generator] = []  # per segment
        self.stat_sums: dict[int, list[torch.Tensor]] = {}  # id(bn) -> [sum of weighted mean, var]
