"""``PrioritizedSampling``: each virtual node forwards its whole batch as candidates and
backpropagates only the samples worth it.

Per virtual node and step (the engine's ``select`` point, ``runtime/plugins.py``)::

    scores  = a scoring forward of the node's batch: eval mode, no_grad, running statistics untouched
    rows    = the node's round(keep * batch) chosen samples, by one of two scores
    loss    = mean of the job's per-sample loss over those rows (forward again, with gradients)

The scores:

- ``"mapd"`` (MAP-D's): ``(p(clean) + (1 - p(given label))) / 2``, where ``p(given label)`` is the
  model's softmax probability of the label in the scoring forward and ``p(clean) = 1 -
  p(mislabeled) - p(corrupted)`` comes from ``MetadataArchaeology``'s latest fit, through the plans
  (1 before the first fit). Learnable samples not yet learned score high; samples that look
  mislabeled or corrupted score low. The top rows are taken; ties go to a seeded random order.
- ``"loss"`` (selective backprop, Jiang et al. 2019, as Composer's ``SelectiveBackprop`` does it):
  each sample's loss percentile ``q`` in its node's batch gives it weight ``q ** beta``; the rows
  are drawn without replacement in proportion to those weights.

Every draw comes from the generator the engine seeds by ``(seed, step, vnode_id)``, so the choice does not depend
on the process or the worker count (Composer's version draws from NumPy's unseeded global
generator).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch

from vnodes.runtime.errors import InvalidJobSpec
from vnodes.runtime.plugins import Plugin, PluginJob, SampleBatch, SampleColumns, WorkerHalf

SCORES = ("mapd", "loss")


def chosen_count(batch_size: int, keep: float) -> int:
    return max(1, int(round(keep * batch_size)))


class PrioritizedWorker(WorkerHalf):
    def __init__(self, keep: float, score: str, beta: float):
        self.keep, self.score, self.beta = keep, score, beta

    def select(self, batch: SampleBatch, generator: torch.Generator) -> torch.Tensor:
        n = len(batch.indices)
        m = chosen_count(n, self.keep)
        g = generator
        if self.score == "loss":
            loss = batch.loss.detach().double().cpu()
            # percentile of each loss within the batch: the share of the batch at or below it (ties share the higher)
            ranks = torch.searchsorted(torch.sort(loss).values, loss, right=True).double()
            weights = (ranks / n) ** self.beta
            rows = torch.multinomial(weights, m, replacement=False, generator=g)
        else:
            probs = torch.softmax(batch.outputs.detach().double(), dim=1)
            given = probs.gather(1, batch.targets.reshape(-1, 1).long().to(probs.device)).squeeze(1).cpu()
            clean = torch.ones(n, dtype=torch.float64)
            if batch.inputs is not None:
                clean = torch.from_numpy(batch.inputs.columns["clean"]).double()
            score = (clean + (1 - given)) / 2
            order = torch.randperm(n, generator=g)  # ties: a seeded random order
            ranked = order[torch.sort(score[order], descending=True, stable=True).indices]
            rows = ranked[:m]
        return torch.sort(rows).values


@dataclasses.dataclass
class PrioritizedSampling(Plugin):
    """Backpropagate each node's ``keep`` fraction of its batch, chosen by ``score`` (module docstring).

    The job's ``vnode_batch_size`` is the candidate batch: to backpropagate b of k x b candidates per
    node, set ``vnode_batch_size=k * b`` and ``keep=1 / k``.

    Args:
        keep: fraction of each node's batch that is backpropagated (at least one sample).
        score: ``"mapd"`` (needs ``MetadataArchaeology`` before it) or ``"loss"`` (selective backprop).
        beta: selective backprop's exponent on the loss percentile (``score="loss"``).
    """

    keep: float = 0.5
    score: str = "mapd"
    beta: float = 1.0

    name: ClassVar[str] = "prioritized"
    changes: ClassVar[frozenset] = frozenset({"batch"})

    def validate(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise InvalidJobSpec("plugins", f"PrioritizedSampling(keep={self.keep!r}): must be a fraction in (0, 1]")
        if self.score not in SCORES:
            raise InvalidJobSpec("plugins", f"PrioritizedSampling(score={self.score!r}): must be one of {SCORES}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 0:
            raise InvalidJobSpec("plugins", f"PrioritizedSampling(beta={self.beta!r}): must be a number >= 0")

    def requires(self) -> tuple[str, ...]:
        return ("recorder", "archaeology") if self.score == "mapd" else ()

    def worker_half(self) -> WorkerHalf:
        return PrioritizedWorker(float(self.keep), self.score, float(self.beta))

    # -- master half -----------------------------------------------------------------------------

    def on_attach(self, job: PluginJob) -> None:
        self._job = job
        self._archaeology = job.peers.get("archaeology") if self.score == "mapd" else None
        if self._archaeology is not None:
            self.backward_samples = 0  # samples backpropagated in committed steps
        self.candidates = 0

    def on_plan(self, step: int, vnodes: Sequence[int], indices: Sequence[np.ndarray]) -> Optional[SampleColumns]:
        if self._archaeology is None or self._archaeology.p_for_step(step) is None:
            return None
        rows = np.concatenate(indices)
        mislabeled = self._archaeology.probability("mislabeled", step)[rows]
        corrupted = self._archaeology.probability("corrupted", step)[rows]
        return SampleColumns(rows, {"clean": np.clip(1 - mislabeled - corrupted, 0, 1).astype(np.float32)})

    def on_step_committed(self, step: int, report: Optional[SampleColumns]) -> None:
        b, n = self._job.vnode_batch_size, self._job.virtual_nodes
        self.candidates += b * n
        self.backward_samples += chosen_count(b, self.keep) * n

    def state_dict(self) -> dict:
        return {"backward_samples": self.backward_samples, "candidates": self.candidates}

    def load_state_dict(self, state: dict) -> None:
        self.backward_samples = int(state.get("backward_samples", 0))
        self.candidates = int(state.get("candidates", 0))
