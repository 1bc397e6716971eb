"""Picklable jobs and DDP hooks for the metadata-archaeology tests (module level: workers import them)."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vnodes.runtime import vnode_seed
from vnodes.runtime.plugins import PluginJob, SampleColumns
from vnodes.runtime.seeding import SELECT_STREAM
from vnodes.scheduler.plugins import DynamicsRecorder, LabelCorrection, MetadataArchaeology, PrioritizedSampling

from jobs import cnn_spec, small_cnn, synthetic_images

SAMPLES = 320  # 4 virtual nodes x 8 per step: 10 steps per epoch; 10 + 10 probes per suite
EPOCHS = 4
STEPS = 10 * EPOCHS


def dataset():
    return synthetic_images(n=SAMPLES, classes=4)


def spec(plugins, **overrides):
    kwargs = dict(model=functools.partial(small_cnn, torch.float32), dataset=dataset, virtual_nodes=4,
                  vnode_batch_size=8, deterministic=True, plugins=plugins)
    kwargs.update(overrides)
    return cnn_spec(**kwargs)


def archaeology_spec(*more, **overrides):
    return spec([DynamicsRecorder(eval_batch_size=16), MetadataArchaeology(), *more], **overrides)


def all_three_spec(**overrides):
    """Archaeology, label correction after one epoch, and MAP-D-scored prioritized sampling."""
    return archaeology_spec(LabelCorrection(warmup_epochs=1), PrioritizedSampling(keep=0.5), **overrides)


# -- label correction with a fixed B: the worker half's math, against DDP ---------------------------

def fixed_b(indices: np.ndarray) -> np.ndarray:
    return ((np.asarray(indices) % 7) / 7.0 * 0.8 + 0.05).astype(np.float32)


@dataclasses.dataclass
class FixedCorrection(LabelCorrection):
    """LabelCorrection whose B is a fixed function of the dataset index, from step 0 (no kNN)."""

    name: ClassVar[str] = "correction"

    def requires(self) -> tuple[str, ...]:
        return ()

    def validate_peers(self, plugins) -> None:
        pass

    def on_attach(self, job: PluginJob) -> None:
        self._job = job

    def on_plan(self, step: int, vnodes: Sequence[int], indices: Sequence[np.ndarray]) -> Optional[SampleColumns]:
        rows = np.concatenate(indices)
        return SampleColumns(rows, {"b": fixed_b(rows)})


def correction_loss(per_sample, outputs, indices, step):
    """What a DDP user writes for Arazo's bootstrapping with B known per sample."""
    b = torch.from_numpy(fixed_b(indices.numpy())).to(per_sample.dtype)
    return (1 - b) * per_sample + b * F.cross_entropy(outputs, outputs.detach().argmax(dim=1), reduction="none")


# -- selective backprop: what a DDP user writes ------------------------------------------------------

KEEP, BETA = 0.5, 2.0


def selective_backprop(model, x, y, spec, step, rank):
    """Score the batch in eval mode without gradients; draw round(KEEP * b) rows without replacement,
    each with weight (its loss percentile in the batch) ** BETA, from the generator of (seed, step, rank)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none").double()
    model.train(was_training)
    n = len(loss)
    percentile = torch.tensor([(loss <= value).sum().item() / n for value in loss.tolist()], dtype=torch.float64)
    g = torch.Generator().manual_seed(vnode_seed(spec.seed, step, rank, SELECT_STREAM))
    rows = torch.multinomial(percentile ** BETA, max(1, round(KEEP * n)), replacement=False, generator=g)
    return torch.sort(rows).values
