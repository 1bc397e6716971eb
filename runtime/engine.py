"""The step engine: one worker's virtual nodes over one cached copy of the weights.

One global step on one worker, as data flows (``compute`` then ``apply``)::

    for v in my virtual nodes (ascending vnode_id):
        batch   = loader[(step, v)]                  # DDP rank v's indices, prefetched
        buffers <- the step's starting running stats # per-VN normalisation state
        rng     <- vnode_seed(seed, step, v)         # per-VN random stream
        loss_i  = loss(model(x), y)                  # per sample
        (loss_i.mean() / N).backward()               # fast: accumulate into one gradient buffer
                                                     # deterministic: push into the canonical tree
    payload = grads + weighted running stats + loss  # reduced across workers by the caller
    apply(payload): optimizer.step(), scheduler.step()

The engine owns no process group: reducing a payload across workers is the caller's job, so the same
engine runs alone (``train(workers=1)``) or inside a worker agent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .data import BatchKey, BatchLoader, move_batch
from .devices import choose_device
from .errors import InvalidJobSpec, JobCodeError, NonFiniteLoss
from .faults import maybe_fail
from .lifecycle import WorkerPhase
from .fused import (FusionContext, GroupFailure, HalveGroup, Raise, Reraise, RunSequentially, check_fusable,
                    check_no_stray_draws, decide, default_generator_states, group_size_for, interleave_batches,
                    leading_rows, patch_model, segment_means)
from .graphs import GroupGraphs, unsupported_reason
from .reduction import Block, Payload, TreeReducer
from .sampler import VNodeSampler
from .seeding import MODEL_STREAM, seed_generators, vnode_seed
from .spec import JobSpec
from .vnode_state import RunningStats

log = logging.getLogger(__name__)


def resolve_device(device: Optional[str], worker_device: Optional[str] = None) -> torch.device:
    """The device to compute on: the job's ``device`` and this worker's own (``--device``), by the
    rules of ``devices.choose_device``. On CUDA always indexed (``cuda:K``); a bare ``"cuda"`` (or
    ``None`` on a machine with CUDA) is this process's local device: ``LOCAL_RANK`` if set, else
    the current CUDA device (``cuda:0`` in a fresh process).

    Raises:
        InvalidJobSpec: ``device`` is not a device, or not one this machine has.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = os.environ.get("LOCAL_RANK")
    if local is not None:
        try:
            local_index = int(local)
        except ValueError:
            raise InvalidJobSpec("LOCAL_RANK", f"{local!r} is not an integer; unset it or pass "
                                 "--device cuda:K") from None
    else:
        local_index = torch.cuda.current_device() if count else 0
    return torch.device(choose_device(device, worker_device, count, local_index))


def call_job_code(role: str, function: Callable, *args: Any) -> Any:
    """Call one of the job's own functions; an exception it raises names that function and where.

    Raises:
        JobCodeError: ``function`` raised (the original is its ``__cause__``).
    """
    try:
        return function(*args)
    except Exception as exc:
        raise JobCodeError.wrap(role, function, exc) from exc


def build_dataset(spec: JobSpec) -> Any:
    """The job's dataset, checked: map-style, with ``(input, target)`` items.

    Raises:
        InvalidJobSpec: it has no ``__len__``, is empty, or its items are not pairs.
        JobCodeError: the job's dataset code raised.
    """
    dataset = call_job_code("dataset builder", spec.dataset)
    try:
        size = len(dataset)
    except TypeError:
        raise InvalidJobSpec("dataset", f"must build a map-style dataset with __len__, got "
                             f"{type(dataset).__name__}") from None
    if size == 0:
        raise InvalidJobSpec("dataset", "built an empty dataset")
    item = call_job_code("dataset's __getitem__ (item 0)", dataset.__getitem__, 0)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        shape = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise InvalidJobSpec("dataset", f"items must be (input, target) pairs, but item 0 is {shape}; "
                             "return (x, y) from the dataset's __getitem__")
    return dataset


@dataclasses.dataclass
class StepPartial:
    """What one worker computed for one step, before the cross-worker reduction.

    Fast mode carries one summed ``payload``; deterministic mode carries the complete subtrees
    (``blocks``) of the canonical reduction tree that this worker's virtual nodes form.
    """

    step: int
    payload: Optional[Payload]
    blocks: list[Block]
    vnode_losses: dict[int, float]  # vnode_id -> mean loss of that node's batch
    used: list[bool]  # per parameter: did any of this worker's nodes produce a gradient


class StepEngine:
    """A model, its optimizer and the virtual-node loop. Built by ``StepEngine.build``."""

    def __init__(self, spec: JobSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: Any, sampler: VNodeSampler, loader: BatchLoader, device: torch.device):
        self.spec = spec
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.sampler = sampler
        self.loader = loader
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats = RunningStats(model, spec.running_stats, spec.virtual_nodes)
        self.float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                torch.get_default_dtype())
        self._loss_checked = False
        self.fusion: Optional[FusionContext] = None
        self.graphs: Optional[GroupGraphs] = None
        self.group_size: Optional[int] = spec.fused_group_size  # None: all of a worker's nodes
        if spec.execution == "fused":
            unknown = check_fusable(model)
            if unknown and spec.cuda_graphs:
                raise InvalidJobSpec("cuda_graphs", "replays fused groups, but these modules may mix samples "
                                     "across virtual nodes: " + "; ".join(unknown) + "; set cuda_graphs=False")
            if unknown:
                warnings.warn("fused execution falls back to sequential: these modules may mix samples "
                              "across virtual nodes: " + "; ".join(unknown), stacklevel=2)
            else:
                self.fusion = FusionContext()
                patch_model(model, self.fusion)
        if spec.cuda_graphs:
            reason = unsupported_reason(model, device)
            if reason is not None:
                raise InvalidJobSpec("cuda_graphs", reason)
            self.graphs = GroupGraphs(model, self.params, self.fusion, self._group_forward_backward)

    @classmethod
    def build(cls, spec: JobSpec, device: Optional[torch.device] = None) -> "StepEngine":
        """Build dataset, model (seeded), optimizer and scheduler; validate what only they can tell.

        Raises:
            InvalidJobSpec: a callable returned the wrong kind of object, or the dataset is too small.
            JobCodeError: one of the job's functions raised.
        """
        spec.validate()
        device = device or resolve_device(spec.device)
        dataset = build_dataset(spec)
        sampler = VNodeSampler(len(dataset), spec.virtual_nodes, spec.vnode_batch_size, spec.seed)

        torch.manual_seed(spec.seed)  # the initial weights are part of the job
        model = call_job_code("model builder", spec.model)
        if not isinstance(model, nn.Module):
            raise InvalidJobSpec("model", f"must build an nn.Module, got {type(model).__name__}")
        model.to(device).train()
        optimizer = call_job_code("optimizer builder", spec.optimizer, model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidJobSpec(
                "optimizer", f"must build a torch.optim.Optimizer from parameters, got {type(optimizer).__name__}"
            )
        lr_scheduler = call_job_code("lr_scheduler builder", spec.lr_scheduler, optimizer) if spec.lr_scheduler else None
        loader = BatchLoader(dataset, sampler, spec.seed, spec.collate_fn, spec.loader_workers,
                             pin_memory=device.type == "cuda")
        return cls(spec, model, optimizer, lr_scheduler, sampler, loader, device)

    # -- one step ----------------------------------------------------------------------------

    def compute(self, step: int, batches: Iterable[tuple[BatchKey, Any]]) -> StepPartial:
        """Forward and backward of this worker's virtual nodes at ``step``, in the given order.

        ``batches`` yields ``((step, vnode_id), batch)`` in ascending ``vnode_id``.
        """
        if self.fusion is not None:
            return self._compute_fused(step, list(batches))
        spec, n = self.spec, self.spec.virtual_nodes
        deterministic = spec.deterministic
        reducer = TreeReducer()
        buffer_sum: Optional[list[torch.Tensor]] = None
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        vnode_losses: dict[int, torch.Tensor] = {}
        used = [False] * len(self.params)
        for p in self.params:  # a step is computed from scratch, also when it is redone
            p.grad = None
        self.stats.begin_step()

        for (batch_step, vnode_id), batch in batches:
            if batch_step != step:
                raise ValueError(f"batch for step {batch_step} arrived during step {step}")
            maybe_fail(WorkerPhase.LOAD, step)
            self.stats.restore()
            inputs, targets = move_batch(batch, self.device, self.float_dtype)
            seed_generators(vnode_seed(spec.seed, step, vnode_id, MODEL_STREAM), self.device)
            maybe_fail(WorkerPhase.FORWARD, step)
            per_sample = spec.loss(self.model(inputs), targets)
            if not self._loss_checked:
                self._check_per_sample(per_sample, targets)
            vnode_loss = per_sample.mean()
            maybe_fail(WorkerPhase.BACKWARD, step)
            (vnode_loss / n).backward()

            vnode_losses[vnode_id] = vnode_loss.detach()
            if deterministic:
                # This node's gradient alone, taken off the parameters, becomes a leaf of the tree.
                grads = self._take_grads(used)
                loss_share = (vnode_loss.detach().to(torch.float64) / n).reshape(1)
                reducer.push(Block(vnode_id, 1, grads + self.stats.contribution(vnode_id) + [loss_share]))
            elif buffer_sum is None:
                buffer_sum = self.stats.contribution(vnode_id)
            else:
                self.stats.accumulate(buffer_sum, vnode_id)

        if not deterministic and vnode_losses:  # fast mode: the loss share of all nodes in one go
            loss_sum = (torch.stack(list(vnode_losses.values())).to(torch.float64) / n).sum().reshape(1)
        return self._finish(step, vnode_losses, buffer_sum, loss_sum, used, reducer)

    def _finish(self, step: int, vnode_losses: dict[int, torch.Tensor], buffer_sum: Optional[list[torch.Tensor]],
                loss_sum: torch.Tensor, used: list[bool], reducer: TreeReducer) -> StepPartial:
        if not vnode_losses:
            raise ValueError(f"step {step}: this worker ran no virtual node")
        self.stats.end_compute()
        losses = torch.stack(list(vnode_losses.values())).tolist()  # the step's one host sync
        vnode_losses_f = dict(zip(vnode_losses.keys(), losses))
        for vnode_id, value in vnode_losses_f.items():
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(step, vnode_id, value)

        if self.spec.deterministic:
            return StepPartial(step, None, reducer.blocks(), vnode_losses_f, used)
        for i, p in enumerate(self.params):
            used[i] = p.grad is not None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return StepPartial(step, grads + (buffer_sum or []) + [loss_sum], [], vnode_losses_f, used)

    def _compute_fused(self, step: int, batches: list[tuple[BatchKey, Any]]) -> StepPartial:
        """Fused execution: groups of virtual nodes as one batch. When an attempt fails, ``decide``
        (pure; its table is in ``fused/fallback.py``) says what runs instead: smaller groups, redone
        and remembered (out of memory, or a module that cannot place the group's samples), sequential
        execution from this step on (anything else fusion cannot do), or an error. This loop is the
        one place that applies a decision."""
        while True:
            size = group_size_for(self.group_size, len(batches))
            try:
                return self._compute_groups(step, batches, size)
            except Exception as exc:
                failure = GroupFailure.of(exc, size, cuda_graphs=self.graphs is not None)
                decision = decide(failure)
                if isinstance(decision, Reraise):
                    raise
                if isinstance(decision, Raise):
                    raise decision.error from None
                if isinstance(decision, RunSequentially):
                    warnings.warn(f"fused execution falls back to sequential from step {step} on: {decision.reason}",
                                  stacklevel=2)
                    self.fusion = None  # the patched modules act as usual from now on (groups == 0)
                    self._discard_attempt()
                    return self.compute(step, batches)
                self.group_size = decision.size  # HalveGroup or OneNodePerGroup: redo the step, and remember
                if isinstance(decision, HalveGroup) and decision.out_of_memory:
                    if self.graphs is not None:
                        self.graphs.clear()
                    log.warning("out of memory with %d virtual nodes per group; retrying step %d with %d",
                                size, step, self.group_size)
                    self._discard_attempt()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    warnings.warn(f"fused execution runs groups of {self.group_size} virtual node(s) from step {step} "
                                  f"on (were {size}; fused_group_size={self.group_size} skips this redo): "
                                  f"{failure.message}", stacklevel=2)
                    self._discard_attempt()

    def _discard_attempt(self) -> None:
        """Forget a failed attempt at a step: its gradients, and its running-buffer updates (e.g.
        num_batches_tracked), so the step can be computed again from scratch."""
        for p in self.params:
            p.grad = None
        self.stats.restore()

    def _compute_groups(self, step: int, batches: list[tuple[BatchKey, Any]], size: int) -> StepPartial:
        spec, n, ctx = self.spec, self.spec.virtual_nodes, self.fusion
        buffer_sum: Optional[list[torch.Tensor]] = None
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        vnode_losses: dict[int, torch.Tensor] = {}
        grad_sum: Optional[list[Optional[torch.Tensor]]] = None  # CUDA graphs: the groups' gradients
        for p in self.params:
            p.grad = None
        self.stats.begin_step()
        for start in range(0, len(batches), size):
            group = batches[start:start + size]
            vnode_ids = [key[1] for key, _ in group]
            if any(key[0] != step for key, _ in group):
                raise ValueError(f"a batch of another step arrived during step {step}")
            maybe_fail(WorkerPhase.LOAD, step)
            self.stats.restore()
            inputs, targets = move_batch(interleave_batches([b for _, b in group]), self.device, self.float_dtype)
            ctx.groups, ctx.rows = len(group), leading_rows(inputs)
            weights = [self.stats.weight(v) for v in vnode_ids]
            ctx.weights = torch.tensor(weights, dtype=torch.float64).to(self.device, non_blocking=True)
            ctx.stat_sums = {}
            try:
                maybe_fail(WorkerPhase.FORWARD, step)
                if self.graphs is not None:
                    maybe_fail(WorkerPhase.BACKWARD, step)
                    means, grads, ctx.stat_sums = self.graphs.run(inputs, targets, ctx.weights, len(group),
                                                                  self.stats.restore)
                    means = means.clone()  # the graph's memory: the next replay overwrites it
                    grad_sum = _add_grads(grad_sum, grads)
                else:
                    ctx.generators = [torch.Generator(self.device).manual_seed(
                        vnode_seed(spec.seed, step, v, MODEL_STREAM)) for v in vnode_ids]
                    before = default_generator_states(self.device)
                    means = self._group_forward_backward(inputs, targets, len(group), step)
                    check_no_stray_draws(before, self.device)
            finally:
                ctx.groups = 0
            for v, m in zip(vnode_ids, means):
                vnode_losses[v] = m
            loss_sum += (means.detach().to(torch.float64).sum() / n).reshape(1)
            # A BatchNorm the forward pass did not use keeps its buffers, weighted like any node's.
            w_sum = sum(weights)  # on the host: no device sync per group
            contribution = [t for module in self.stats.modules for t in ctx.stat_sums.get(
                id(module), (module.running_mean * w_sum, module.running_var * w_sum))]
            if contribution:
                if buffer_sum is None:
                    buffer_sum = [t.clone() for t in contribution] if self.graphs is not None else contribution
                else:
                    torch._foreach_add_(buffer_sum, contribution)
        if grad_sum is not None:
            for p, g in zip(self.params, grad_sum):
                p.grad = g
        return self._finish(step, vnode_losses, buffer_sum, loss_sum, [False] * len(self.params), TreeReducer())

    def _group_forward_backward(self, inputs: Any, targets: Any, groups: int, step: int = -1) -> torch.Tensor:
        """Forward, loss and backward of one fused group; returns each node's mean loss. Also what a
        CUDA graph captures (``graphs.py``)."""
        per_sample = self.spec.loss(self.model(inputs), targets)
        if not self._loss_checked:
            self._check_per_sample(per_sample, targets)
        means = segment_means(per_sample, groups)  # each node's mean loss (rows are interleaved)
        maybe_fail(WorkerPhase.BACKWARD, step)
        self.fusion.in_backward = True  # a patched module running now is recomputed (checkpointing)
        try:
            (means.sum() / self.spec.virtual_nodes).backward()
        finally:
            self.fusion.in_backward = False
        return means.detach()

    def apply(self, total: Payload, used: list[bool]) -> float:
        """Install the reduced gradients and running stats, step the optimizer; return the loss."""
        n_params, n_bufs = len(self.params), len(self.stats.float_buffers)
        for p, grad, was_used in zip(self.params, total[:n_params], used):
            p.grad = grad if was_used else None  # unused everywhere: the optimizer skips it, as in DDP
        self.stats.finish_step(total[n_params:n_params + n_bufs])
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total[-1].item())

    def _take_grads(self, used: list[bool]) -> list[torch.Tensor]:
        grads = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                grads.append(torch.zeros_like(p))
            else:
                used[i] = True
                grads.append(p.grad)
                p.grad = None
        return grads

    def _check_per_sample(self, per_sample: Any, targets: Any) -> None:
        expected = len(targets) if hasattr(targets, "__len__") else self.spec.vnode_batch_size
        if not isinstance(per_sample, torch.Tensor) or per_sample.shape != (expected,):
            shape = list(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise InvalidJobSpec(
                "loss",
                f"must return one loss per sample (shape [{expected}]), got {shape}. The gradient is "
                "the mean over virtual nodes of each node's mean per-sample loss, and plugins need "
                "the per-sample values: use reduction='none', e.g. "
                "functools.partial(torch.nn.functional.cross_entropy, reduction='none').",
            )
        self._loss_checked = True

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _add_grads(total: Optional[list[Optional[torch.Tensor]]],
               grads: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """``total + grads`` per parameter (None: no gradient yet), copying out of graph memory."""
    if total is None:
        return [g.clone() if g is not None else None for g in grads]
    both = [i for i, g in enumerate(grads) if g is not None and total[i] is not None]
    if both:
        torch._foreach_add_([total[i] for i in both], [grads[i] for i in both])  # one launch, not one per tensor
    for i, g in enumerate(grads):
        if g is not None and total[i] is None:
            total[i] = g.clone()
    return total
