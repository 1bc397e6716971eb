"""Small picklable jobs shared by the tests (module level, so spawned processes can import them)."""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vnodes.runtime import JobSpec


def synthetic_images(n: int = 200, seed: int = 1234, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float() * 0.5
    return TensorDataset(x, y)


class SmallCNN(nn.Module):
    """Conv + BatchNorm + Dropout: batch statistics, running statistics and a random stream."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 4 * 4, 16),
                                  nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


def small_cnn(dtype: torch.dtype = torch.float64) -> nn.Module:
    return SmallCNN().to(dtype)


def per_sample_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def scalar_ce(outputs, targets):
    return F.cross_entropy(outputs, targets)


def cnn_spec(**overrides) -> JobSpec:
    kwargs = dict(
        model=small_cnn,
        dataset=synthetic_images,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4),
        loss=per_sample_ce,
        virtual_nodes=4,
        vnode_batch_size=8,
        seed=7,
        device="cpu",
    )
    kwargs.update(overrides)
    return JobSpec(**kwargs)


def det_f32_spec() -> JobSpec:
    """Deterministic, float32: the spec the multi-process tests compare bit for bit."""
    return cnn_spec(model=functools.partial(small_cnn, torch.float32), deterministic=True)


class SlowReads(torch.utils.data.Dataset):
    """``synthetic_images`` read with a delay per sample: stretches every step (so a test can act while
    a job runs) without changing anything it computes."""

    def __init__(self, delay_s: float, seed: int = 1234):
        self.data, self.delay_s = synthetic_images(seed=seed), delay_s

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        import time

        time.sleep(self.delay_s)
        return self.data[i]


def slow_det_spec() -> JobSpec:
    """``det_f32_spec`` whose reads take 2 ms a sample (about 64 ms a step on one worker)."""
    return dataclasses.replace(det_f32_spec(), dataset=functools.partial(SlowReads, 0.002))
