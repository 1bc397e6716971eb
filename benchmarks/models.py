"""Models the benchmarks share. Plain torch only: ``gpu.py`` runs where nothing else is installed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """The residual block of ResNet-18/34."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""
    layers, c_in = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
    for i, stride in enumerate((1, 2, 2, 2)):
        c_out = width * 2 ** i
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


class SegmentMajorBatchNorm(nn.Module):
    """Per-segment BatchNorm for a batch of ``groups`` segments stored one after another, written the
    obvious way: copy into the (segment, channel) layout, one native call, copy back.

    The benchmarks' anchor for what fused mode saves by interleaving its rows (vnodes did exactly
    this before 2026-11-30). It tracks no running statistics, which only makes the anchor faster.
    """

    def __init__(self, bn: nn.Module, groups: int):
        super().__init__()
        self.bn, self.groups = bn, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c, rest = self.groups, x.shape[1], x.shape[2:]
        b = x.shape[0] // g
        wide = x.reshape(g, b, c, *rest).transpose(0, 1).reshape(b, g * c, *rest)
        y = F.batch_norm(wide, None, None, self.bn.weight.repeat(g), self.bn.bias.repeat(g), True, 0.0, self.bn.eps)
        return y.reshape(b, g, c, *rest).transpose(0, 1).reshape(x.shape)


def with_segment_major_batchnorm(model: nn.Module, groups: int) -> nn.Module:
    """``model`` with every BatchNorm replaced by a ``SegmentMajorBatchNorm`` of ``groups`` segments."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, SegmentMajorBatchNorm(child, groups))
        else:
            with_segment_major_batchnorm(child, groups)
    return model
