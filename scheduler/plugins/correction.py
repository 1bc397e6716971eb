"""``LabelCorrection``: train each sample toward the model's own prediction in proportion to how
likely its label is wrong.

After a warm-up, each sample's per-sample loss becomes (Arazo et al., 2019, as MAP-D uses it)::

    B    = clip(p(mislabeled), 1e-4, 1 - 1e-4)        # from MetadataArchaeology's latest fit
    loss = (1 - B) * CE(outputs, given label) + B * CE(outputs, argmax of outputs)

``B`` is computed on the master and reaches the workers through the plans (``on_plan``): the
rows of a step's samples, from the kNN fit on the epochs ``MetadataArchaeology.usable_epochs(step)``
(the fit after epoch ``e`` counts from the second step of epoch ``e + 1`` on, because the
evaluation pass of epoch ``e`` rides on that epoch's first step). Before the warm-up ends no ``B`` is sent, and the loss is
the job's own. The given-label term is the job's per-sample loss, so the job's loss should be the
cross-entropy for this to be Arazo's; the prediction term is ``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vnodes.runtime.errors import InvalidJobSpec
from vnodes.runtime.plugins import Plugin, PluginJob, SampleBatch, SampleColumns, WorkerHalf

CLIP = 1e-4
DEFAULT_WARMUP = 5  # epochs; a function of the job, not of how many steps one train() call runs


class CorrectionWorker(WorkerHalf):
    def loss(self, batch: SampleBatch, per_sample: torch.Tensor, outputs: Any) -> torch.Tensor:
        if batch.inputs is None:  # warm-up
            return per_sample
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
            raise TypeError(f"LabelCorrection needs logits [batch, classes]; the model returned "
                            f"{type(outputs).__name__}{tuple(getattr(outputs, 'shape', ()))}")
        b = torch.from_numpy(batch.inputs.columns["b"]).to(device=per_sample.device, dtype=per_sample.dtype)
        predicted = F.cross_entropy(outputs, outputs.detach().argmax(dim=1), reduction="none").to(per_sample.dtype)
        return (1 - b) * per_sample + b * predicted


@dataclasses.dataclass
class LabelCorrection(Plugin):
    """Bootstrap each sample's loss toward the model's prediction by p(mislabeled) (module docstring).

    Args:
        warmup_epochs: epochs trained on the given labels before the first correction (the kNN needs
            trajectories to vote on); default 5.
    """

    warmup_epochs: Optional[int] = None

    name: ClassVar[str] = "correction"
    changes: ClassVar[frozenset] = frozenset({"loss"})

    def validate(self) -> None:
        w = self.warmup_epochs
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise InvalidJobSpec("plugins", f"LabelCorrection(warmup_epochs={w!r}): must be None (the default: "
                                 f"{DEFAULT_WARMUP}) or an integer >= 1")

    def requires(self) -> tuple[str, ...]:
        return ("recorder", "archaeology")

    def validate_peers(self, plugins: Sequence[Plugin]) -> None:
        archaeology = next(p for p in plugins if p.name == "archaeology")
        if "mislabeled" not in archaeology.suites:
            raise InvalidJobSpec("plugins", "LabelCorrection uses p(mislabeled): keep 'mislabeled' in "
                                 "MetadataArchaeology(suites=...)")

    def worker_half(self) -> WorkerHalf:
        return CorrectionWorker()

    # -- master half -----------------------------------------------------------------------------

    def on_attach(self, job: PluginJob) -> None:
        self._job = job
        self._archaeology = job.peers["archaeology"]
        self.warmup = self.warmup_epochs if self.warmup_epochs is not None else DEFAULT_WARMUP

    def on_plan(self, step: int, vnodes: Sequence[int], indices: Sequence[np.ndarray]) -> Optional[SampleColumns]:
        archaeology = self._archaeology
        if archaeology.usable_epochs(step) < self.warmup:
            return None
        rows = np.concatenate(indices)
        b = np.clip(archaeology.probability("mislabeled", step)[rows], CLIP, 1 - CLIP).astype(np.float32)
        return SampleColumns(rows, {"b": b})
