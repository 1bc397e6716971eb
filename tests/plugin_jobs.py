"""Picklable jobs with plugins, shared by the plugin tests (module level: workers import them)."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch

from vnodes.runtime.plugins import Plugin, PluginJob, SampleBatch, SampleColumns, WorkerHalf
from vnodes.scheduler.plugins import DynamicsRecorder

from jobs import cnn_spec, small_cnn, synthetic_images

DATASET = 96  # samples; 4 virtual nodes x 4 per step: 6 steps per epoch
STEPS = 18  # three epochs


def dataset():
    return synthetic_images(n=DATASET)


def recorder_spec(**overrides):
    kwargs = dict(model=functools.partial(small_cnn, torch.float32), dataset=dataset, virtual_nodes=4,
                  vnode_batch_size=4, deterministic=True, plugins=[DynamicsRecorder(eval_batch_size=8)])
    kwargs.update(overrides)
    return cnn_spec(**kwargs)


class WeightsHalf(WorkerHalf):
    """Scales each sample's loss by the weight the master put in the plan."""

    def loss(self, batch: SampleBatch, per_sample: torch.Tensor, outputs) -> torch.Tensor:
        weights = torch.from_numpy(batch.inputs.columns["weight"].copy()).to(per_sample)
        return per_sample * weights

    def report(self, batches: list[SampleBatch]) -> Optional[SampleColumns]:
        return SampleColumns(torch.cat([b.indices for b in batches]).numpy(),
                             {"loss": torch.cat([b.loss for b in batches]).float().numpy()})


@dataclasses.dataclass
class LossWeights(Plugin):
    """A test mutator: a sample whose committed loss was above the step's median trains with
    ``weight`` the next time it is seen (a function of committed history only)."""

    weight: float = 2.0
    name: ClassVar[str] = "loss_weights"
    changes: ClassVar[frozenset] = frozenset({"loss"})

    def worker_half(self) -> WorkerHalf:
        return WeightsHalf()

    def on_attach(self, job: PluginJob) -> None:
        self._heavy = np.zeros(job.num_samples, dtype=bool)

    def on_step_committed(self, step: int, report: Optional[SampleColumns]) -> None:
        loss = report.columns["loss"]
        self._heavy[report.indices] = loss > np.median(loss)

    def on_plan(self, step: int, vnodes: Sequence[int], indices: Sequence[np.ndarray]) -> Optional[SampleColumns]:
        every = np.concatenate(indices)
        return SampleColumns(every, {"weight": np.where(self._heavy[every], self.weight, 1.0).astype(np.float32)})

    def state_dict(self):
        return {"heavy": torch.from_numpy(self._heavy.copy())}

    def load_state_dict(self, state):
        if "heavy" in state:
            self._heavy = state["heavy"].numpy().copy()
        else:
            self._heavy[:] = False


def mutator_spec(**overrides):
    return recorder_spec(plugins=[DynamicsRecorder(eval_batch_size=8), LossWeights()], **overrides)


def plain_spec():
    """The same job without plugins (``vnodes run ... --plugin recorder`` adds one)."""
    return recorder_spec(plugins=[])
