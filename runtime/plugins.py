"""Plugins: code on the master that uses the per-sample signal every virtual node computes.

A plugin (``Plugin``, enabled as ``JobSpec(plugins=[...])``) has two halves:

- The **worker half** (``WorkerHalf``, built by ``Plugin.worker_half`` and run in every worker) sees,
  for each virtual node at each step, a ``SampleBatch``: the dataset indices of the node's samples,
  their per-sample losses, and the model's outputs and targets (from which the true-class
  probability, the margin and the predicted class follow: ``classification_signals``). It reduces a
  step's batches to one compact report, ``SampleColumns``: indices plus packed value columns, never
  one message per sample. The report rides on the step's commit message.
- The **master half** (the ``on_*`` methods of the plugin) consumes the committed reports, in step
  order, exactly once per committed step, and may put per-sample inputs into the next plans
  (``on_plan``: weights, replacement targets, scores).

**Observers** (``changes`` empty, e.g. the dynamics recorder) never change training. **Mutators**
declare what they change (``changes``, e.g. ``{"loss"}``: their worker half's ``loss`` replaces
each node's per-sample loss). Everything a mutator decides must be a function of committed history
(the reports of earlier steps, its own checkpointed state) and of ``(seed, step, vnode_id)``: never
of which worker ran a node or how many workers there are. Then a job with plugins is bitwise equal
on any number of workers in deterministic mode, through kills, joins and master restarts.

A plugin's master-half state is saved in every checkpoint (``state_dict``/``load_state_dict``) and
restored with it. Its identity and settings (``describe``) are part of the job's fingerprint.

Plugins may also ask for an **evaluation pass** (``eval_pass_batch_size``): at the end of each epoch,
every sample of the training set is evaluated once with the weights of that moment, sharded across
virtual nodes (node ``v`` evaluates samples ``v, v + N, v + 2N, ...``, in batches of
``eval_pass_batch_size()``) and so across workers, in eval mode, under ``no_grad``, without touching
running statistics or random streams. Its batches reach the worker halves with ``source="eval"``
and the master halves through ``on_eval``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

#: column dtypes a report may carry (numpy ``dtype.str`` without the byte order): what crosses the wire
COLUMN_DTYPES = ("f4", "f8", "i4", "i8", "u1")
SOURCES = ("train", "eval")


@dataclasses.dataclass
class SampleColumns:
    """Per-sample values, packed: ``indices[i]`` is the dataset index of row ``i`` of every column.

    Rows are in virtual-node order (the order of the nodes, then of each node's samples), so that a
    merged report does not depend on which worker sent which part.
    """

    indices: np.ndarray  # int64 [n]
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # each [n]

    def __post_init__(self) -> None:
        self.indices = np.ascontiguousarray(self.indices, dtype=np.int64).reshape(-1)
        for name, values in list(self.columns.items()):
            values = np.ascontiguousarray(values)
            if values.ndim != 1 or len(values) != len(self.indices):
                raise ValueError(f"column {name!r} has shape {values.shape}, expected [{len(self.indices)}] "
                                 "(one value per sample)")
            if values.dtype.str[1:] not in COLUMN_DTYPES:
                raise ValueError(f"column {name!r} has dtype {values.dtype}; use one of {COLUMN_DTYPES}")
            self.columns[name] = values

    def __len__(self) -> int:
        return len(self.indices)

    @classmethod
    def concat(cls, parts: Sequence["SampleColumns"]) -> "SampleColumns":
        """Rows of ``parts`` one after the other (every part has the same columns)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return cls(np.zeros(0, np.int64))
        if len(parts) == 1:
            return parts[0]
        names = list(parts[0].columns)
        for p in parts[1:]:
            if list(p.columns) != names:
                raise ValueError(f"cannot concatenate reports with columns {names} and {list(p.columns)}")
        return cls(np.concatenate([p.indices for p in parts]),
                   {n: np.concatenate([p.columns[n] for p in parts]) for n in names})

    def select(self, rows: np.ndarray) -> "SampleColumns":
        return SampleColumns(self.indices[rows], {n: v[rows] for n, v in self.columns.items()})


@dataclasses.dataclass
class SampleBatch:
    """One virtual node's samples at one point of the loop: what a plugin's worker half sees."""

    source: str  # "train" (a training step), "eval" (the end-of-epoch evaluation pass), "score" (``select``)
    step: int  # the training step (for "eval": the step the pass runs before)
    vnode_id: int
    indices: torch.Tensor  # int64 [b], on the CPU: dataset indices
    loss: torch.Tensor  # [b] the job's per-sample loss, detached
    outputs: Any  # what the model returned, detached
    targets: Any
    inputs: Optional[SampleColumns] = None  # this plugin's per-sample inputs from the plan (mutators)


class WorkerHalf:
    """The part of a plugin that runs next to the device. Picklable (it travels with the job)."""

    def loss(self, batch: SampleBatch, per_sample: torch.Tensor, outputs: Any) -> torch.Tensor:
        """A mutator that changes ``"loss"``: the per-sample loss to train on instead of
        ``per_sample`` (differentiable; ``batch.loss`` is its detached value). ``outputs``: the
        node's model outputs, differentiable (``batch.outputs`` is their detached value).
        Observers never get here."""
        return per_sample

    def select(self, batch: SampleBatch, generator: torch.Generator) -> torch.Tensor:
        """A mutator that changes ``"batch"``: the rows of a node's batch to train on (int64,
        ascending), from ``batch``: a scoring pass over the whole batch (``source="score"``), run in
        eval mode under ``no_grad`` (running statistics untouched). Every node selects as many rows.
        Any random choice draws from ``generator`` (a CPU generator seeded by ``(seed, step,
        vnode_id)``), so the choice depends on the batch and the plan's inputs alone."""
        return torch.arange(len(batch.indices))

    def report(self, batches: list[SampleBatch]) -> Optional[SampleColumns]:
        """Reduce one step's (or one evaluation chunk's) batches, in virtual-node order, to the
        compact report that rides on the commit. None: nothing to report."""
        return None


@dataclasses.dataclass(frozen=True)
class PluginJob:
    """What a plugin's master half knows about its job (``Plugin.on_attach``)."""

    num_samples: int
    virtual_nodes: int
    vnode_batch_size: int
    steps_per_epoch: int
    steps: int
    seed: int
    deterministic: bool
    run_dir: Optional[Path]  # None: no directory (nothing to write)
    dataset: Any = dataclasses.field(default=None, compare=False, repr=False)  # as the workers see it
    peers: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # name -> master half

    @property
    def epochs(self) -> int:
        """Complete epochs in the run."""
        return self.steps // self.steps_per_epoch


class Plugin:
    """Both halves of a plugin. Subclasses are dataclasses of their settings (picklable, no state
    in the constructor); the master half's state is created in ``on_attach``.

    Class attributes: ``name`` (unique in a job: it keys reports, plan inputs and checkpoint
    state) and ``changes`` (empty for an observer; a mutator names what it changes:
    ``"loss"``, its worker half's ``loss`` replaces each node's per-sample loss; ``"batch"``, its
    worker half's ``select`` picks the rows of each node's batch that are trained on;
    ``"dataset"``, ``wrap_dataset`` alters the samples).
    """

    name: ClassVar[str] = ""
    changes: ClassVar[frozenset] = frozenset()

    @property
    def is_observer(self) -> bool:
        return not self.changes

    def describe(self) -> str:
        """Identity and settings, for the job's fingerprint."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return f"{type(self).__module__}.{type(self).__qualname__}:{self.name}:{sorted(fields.items())!r}"

    def validate(self) -> None:
        """Raise ``InvalidJobSpec`` for a bad setting (before any work)."""

    def requires(self) -> tuple[str, ...]:
        """Names of the plugins that must come before this one in ``JobSpec.plugins`` (the master
        halves this one reads, through ``PluginJob.peers``, once they have seen each event)."""
        return ()

    def validate_peers(self, plugins: Sequence["Plugin"]) -> None:
        """Raise ``InvalidJobSpec`` when the job's other plugins are set up in a way this one cannot use."""

    def wrap_dataset(self, dataset: Any, seed: int) -> Any:
        """Plugins that change ``"dataset"``: the dataset the job trains on, from the one it built.
        Called in every process that builds the dataset (workers and master), in plugin order; the
        result must depend on ``dataset`` and ``seed`` alone."""
        return dataset

    # -- worker half -------------------------------------------------------------------------

    def worker_half(self) -> WorkerHalf:
        return WorkerHalf()

    def eval_pass_batch_size(self) -> Optional[int]:
        """Samples per virtual node per batch of the end-of-epoch evaluation pass; None: no pass."""
        return None

    # -- master half -------------------------------------------------------------------------

    def on_attach(self, job: PluginJob) -> None:
        """The master starts (or restarts): create state, open files. Called before ``load_state_dict``."""

    def on_step_committed(self, step: int, report: Optional[SampleColumns]) -> None:
        """Step ``step`` committed; ``report``: its worker halves' reports merged (virtual-node order)."""

    def on_eval(self, epoch: int, report: Optional[SampleColumns]) -> None:
        """The evaluation pass after epoch ``epoch`` committed (with the weights at its end)."""

    def on_plan(self, step: int, vnodes: Sequence[int], indices: Sequence[np.ndarray]) -> Optional[SampleColumns]:
        """Mutators: per-sample inputs for step ``step``'s samples of ``vnodes`` (``indices[k]``: the
        dataset indices of ``vnodes[k]``), rows in that order. Called once per step for all nodes."""
        return None

    def on_fit_end(self) -> None:
        """The job ended (done or failed): flush and close."""

    def state_dict(self) -> dict[str, Any]:
        """The master half's state at a step boundary (tensors, numbers, strings; no numpy)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def classification_signals(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ``true_prob`` (softmax probability of the target class), ``margin`` (that
    probability minus the largest other class's) and ``pred`` (argmax) from logits ``[n, C]`` and
    integer targets ``[n]``. All computed in float32 in one pass over the batch."""
    logits = outputs.detach().float()
    probs = torch.softmax(logits, dim=1)
    targets = targets.long().reshape(-1, 1)
    true_prob = probs.gather(1, targets).squeeze(1)
    others = probs.scatter(1, targets, float("-inf"))
    margin = true_prob - others.max(dim=1).values
    return {"true_prob": true_prob, "margin": margin, "pred": logits.argmax(dim=1)}
