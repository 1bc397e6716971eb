"""The step engine: one worker's virtual nodes over one cached copy of the weights.

One global step on one worker, as data flows (``compute`` then ``apply``)::

    for v in my virtual nodes (ascending vnode_id):
        batch   = loader[(step, v)]                  # DDP rank v's indices, prefetched
        buffers <- the step's starting running stats # per-VN normalisation state
        rng     <- vnode_seed(seed, step, v)         # per-VN random stream
        loss_i  = loss(model(x), y)                  # per sample
        plugins see (indices, loss_i, outputs)       # mutators may replace loss_i (plugins.py)
        (loss_i.mean() / N).backward()               # fast: accumulate into one gradient buffer
                                                     # deterministic: push into the canonical tree
    payload = grads + weighted running stats + loss  # reduced across workers by the caller
    reports = each plugin's worker half(views)       # compact per-step reports, for the commit
    apply(payload): optimizer.step(), scheduler.step()

The engine owns no process group: reducing a payload across workers is the caller's job, so the same
engine runs alone (``train(workers=1)``) or inside a worker agent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data._utils.collate import default_collate

from .data import BatchKey, BatchLoader, move_batch, take_rows
from .devices import choose_device
from .errors import InvalidJobSpec, JobCodeError, NonFiniteLoss
from .events import Event
from .fused import (FusionContext, GroupFailure, HalveGroup, Raise, Reraise, RunSequentially, check_fusable,
                    check_no_stray_draws, decide, default_generator_states, group_size_for, interleave_batches,
                    leading_rows, patch_model, segment_means)
from .graphs import GroupGraphs, unsupported_reason
from .plugins import SampleBatch, SampleColumns, WorkerHalf
from .precision import GlobalGradScaler, autocast
from .reduction import Block, Payload, TreeReducer
from .sampler import VNodeSampler
from .seeding import EVAL_STREAM, MODEL_STREAM, SELECT_STREAM, seed_everything, seed_generators, vnode_seed
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
    """The job's dataset, checked: map-style, with ``(input, target)`` items (any items with
    ``step_fn``); as the plugins that change ``"dataset"`` wrap it.

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
    if spec.step_fn is None and (not isinstance(item, (tuple, list)) or len(item) != 2):
        shape = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise InvalidJobSpec("dataset", f"items must be (input, target) pairs, but item 0 is {shape}; "
                             "return (x, y) from the dataset's __getitem__, or pass step_fn=(model, batch) -> "
                             "per-sample loss to train on batches of any shape")
    for plugin in spec.plugins:  # e.g. metadata archaeology's probes (plugins.py)
        if "dataset" in plugin.changes:
            dataset = plugin.wrap_dataset(dataset, spec.seed)
    return dataset


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What the reduced gradient says about a step, the same on every worker (``StepEngine.prepare``)."""

    grad_norm: float  # total 2-norm of the global gradient (unscaled; inf or NaN on an fp16 overflow)
    skipped: bool  # fp16 overflow: the optimizer does not step (everywhere)
    lr: float  # the learning rate of the first parameter group for this step
    values: dict[str, float] = dataclasses.field(default_factory=dict)  # step_fn's metrics, each a mean over every node
    norm: Optional[torch.Tensor] = dataclasses.field(default=None, compare=False, repr=False)  # grad_norm, in the grads' dtype


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
    reports: dict[str, SampleColumns] = dataclasses.field(default_factory=dict)  # plugin name -> report


def compile_in_place(model: nn.Module, options: dict) -> None:
    """``torch.compile`` the model's forward (and so its backward) in place: ``model(...)`` runs the
    compiled forward; parameters, ``state_dict`` and the fused patches stay the module's own. Compiled
    lazily, at the first batch.

    Not ``nn.Module.compile``: that compiles ``_call_impl``, a frame of torch.nn that dynamo does not
    trace, so a model whose own ``forward`` is torch.nn's (an ``nn.Sequential`` root, say) was never
    captured whole: each child's forward became a graph of its own (7 for a ResNet-18 built as a
    Sequential), and in fused mode, whose BatchNorm looks its module up by ``id``, one per module
    until dynamo's recompile limit. This calls ``forward`` from a frame of its own."""
    forward = model.forward  # bound: the fused patch, where the root itself is a patched module

    def compiled_forward(*args, **kwargs):
        return forward(*args, **kwargs)

    model.forward = torch.compile(compiled_forward, **options)


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
        self.scheduler_evaluated = -1  # lr_scheduler_metric: the step of the last evaluation it stepped on
        self.metric_names: Optional[tuple[str, ...]] = None  # step_fn's per-sample metrics, once it returned some
        self._metrics: Optional[dict[str, torch.Tensor]] = None  # those of the last forward
        self._metric_sum: Optional[torch.Tensor] = None  # this step's: sum over this worker's nodes of mean / N
        self.scaler = GlobalGradScaler(device, spec.grad_scaler) if spec.precision == "fp16" else None
        self._chosen_count: Optional[int] = None  # rows a selecting plugin chose per node in this step
        self.fusion: Optional[FusionContext] = None
        self.graphs: Optional[GroupGraphs] = None
        self.group_size: Optional[int] = spec.fused_group_size  # None: all of a worker's nodes
        self.emit: Callable[..., None] = _no_subscriber  # (event, step, work=1): the worker's event subscribers
        # Plugins' worker halves: (name, changes the loss, half); the one that chooses rows, if any.
        self.halves: list[tuple[str, bool, WorkerHalf]] = [(p.name, "loss" in p.changes, p.worker_half())
                                                             for p in spec.plugins]
        self.selector: Optional[tuple[str, WorkerHalf]] = next(
            ((name, half) for (name, _, half), p in zip(self.halves, spec.plugins) if "batch" in p.changes), None)
        self.eval_batch_size: Optional[int] = max((p.eval_pass_batch_size() or 0 for p in spec.plugins), default=0) or None
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
        compile_options = spec.compile_options()
        if compile_options is not None:
            compile_in_place(model, compile_options)
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
        params = model.parameters()
        if spec.param_groups is not None:
            params = call_job_code("param_groups builder", spec.param_groups, model)
            if not isinstance(params, (list, tuple)) or not params:
                raise InvalidJobSpec("param_groups", f"must return a non-empty list of parameter groups (dicts with "
                                     f"'params'), got {type(params).__name__}")
        optimizer = call_job_code("optimizer builder", spec.optimizer, params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidJobSpec(
                "optimizer", f"must build a torch.optim.Optimizer from parameters, got {type(optimizer).__name__}"
            )
        lr_scheduler = call_job_code("lr_scheduler builder", spec.lr_scheduler, optimizer) if spec.lr_scheduler else None
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and spec.lr_scheduler_metric is None:
            raise InvalidJobSpec("lr_scheduler_metric", "is needed: ReduceLROnPlateau steps on a metric; name the "
                                 "evaluation metric it watches, e.g. lr_scheduler_metric='loss' (with eval_dataset "
                                 "and eval_every set)")
        loader = BatchLoader(dataset, sampler, spec.seed, spec.collate_fn, spec.loader_workers,
                             pin_memory=device.type == "cuda")
        return cls(spec, model, optimizer, lr_scheduler, sampler, loader, device)

    # -- one step ----------------------------------------------------------------------------

    def compute(self, step: int, batches: Iterable[tuple[BatchKey, Any]],
                inputs: Optional[dict[str, SampleColumns]] = None) -> StepPartial:
        """Forward and backward of this worker's virtual nodes at ``step``, in the given order.

        ``batches`` yields ``((step, vnode_id), batch)`` in ascending ``vnode_id``; ``inputs``: the
        plan's per-sample inputs of each mutator (plugin name -> rows of these nodes, in order).
        """
        if self.fusion is not None:
            return self._compute_fused(step, list(batches), inputs)
        spec, n = self.spec, self.spec.virtual_nodes
        deterministic = spec.deterministic
        reducer = TreeReducer()
        buffer_sum: Optional[list[torch.Tensor]] = None
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        vnode_losses: dict[int, torch.Tensor] = {}
        used = [False] * len(self.params)
        views: list[SampleBatch] = []
        for p in self.params:  # a step is computed from scratch, also when it is redone
            p.grad = None
        self._chosen_count = None
        self._metric_sum = None
        self.stats.begin_step()

        for position, ((batch_step, vnode_id), batch) in enumerate(batches):
            if batch_step != step:
                raise ValueError(f"batch for step {batch_step} arrived during step {step}")
            self.stats.restore()
            inputs_v, targets = self._split(move_batch(batch, self.device, self.float_dtype))
            chosen = None
            if self.selector is not None:
                chosen = self._select(step, vnode_id, position, inputs_v, targets, inputs)
                inputs_v, targets = take_rows(inputs_v, chosen), take_rows(targets, chosen)
            seed_generators(vnode_seed(spec.seed, step, vnode_id, MODEL_STREAM), self.device)
            self.emit(Event.BATCH_LOADED, step)
            outputs, per_sample = self._per_sample(inputs_v, targets)
            if not self._loss_checked:
                self._check_per_sample(per_sample, self._rows(inputs_v, targets))
            self.emit(Event.LOSS_COMPUTED, step)
            if self.halves:
                per_sample = self._see(views, step, vnode_id, position, per_sample, outputs, targets, inputs, chosen)
            vnode_loss = per_sample.mean()
            self._backward(vnode_loss / n)
            self.emit(Event.BACKWARD_DONE, step)

            vnode_losses[vnode_id] = vnode_loss.detach()
            metric_share = self._metric_share(1)
            if deterministic:
                # This node's gradient alone, taken off the parameters, becomes a leaf of the tree.
                grads = self._take_grads(used)
                loss_share = (vnode_loss.detach().to(torch.float64) / n).reshape(1)
                reducer.push(Block(vnode_id, 1, grads + self.stats.contribution(vnode_id) +
                                   ([metric_share] if metric_share is not None else []) + [loss_share]))
            else:
                self._add_metrics(metric_share)
                if buffer_sum is None:
                    buffer_sum = self.stats.contribution(vnode_id)
                else:
                    self.stats.accumulate(buffer_sum, vnode_id)

        if not deterministic and vnode_losses:  # fast mode: the loss share of all nodes in one go
            loss_sum = (torch.stack(list(vnode_losses.values())).to(torch.float64) / n).sum().reshape(1)
        partial = self._finish(step, vnode_losses, buffer_sum, loss_sum, used, reducer)
        partial.reports = self._reports(views)
        return partial

    # -- plugins -------------------------------------------------------------------------------

    def _plan_rows(self, name: str, step: int, vnode_id: int, position: int,
                   inputs: Optional[dict[str, SampleColumns]], indices: torch.Tensor,
                   chosen: Optional[torch.Tensor] = None) -> Optional[SampleColumns]:
        """Plugin ``name``'s plan inputs for the node at ``position`` (``chosen``: of these rows only)."""
        if not inputs or name not in inputs:
            return None
        b = self.spec.vnode_batch_size
        rows = np.arange(position * b, (position + 1) * b)
        if chosen is not None:
            rows = rows[chosen.cpu().numpy()]
        out = inputs[name].select(rows)
        if not np.array_equal(out.indices, indices.numpy()):
            raise ValueError(f"plugin {name!r}: the plan's inputs for virtual node {vnode_id} at step {step} "
                             "are for other samples")
        return out

    def _select(self, step: int, vnode_id: int, position: int, inputs_v: Any, targets: Any,
                inputs: Optional[dict[str, SampleColumns]]) -> torch.Tensor:
        """The rows of a node's batch that it trains on: the selecting plugin's choice after a scoring
        forward of the whole batch (eval mode, no_grad; running statistics and random streams untouched)."""
        name, half = self.selector
        indices = torch.tensor(self.sampler.indices(step, vnode_id), dtype=torch.int64)
        with self._evaluating():
            outputs, per_sample = self._per_sample(inputs_v, targets)
        view = SampleBatch("score", step, vnode_id, indices, per_sample.detach(), _detach(outputs), targets,
                           self._plan_rows(name, step, vnode_id, position, inputs, indices))
        generator = torch.Generator().manual_seed(vnode_seed(self.spec.seed, step, vnode_id, SELECT_STREAM))
        chosen = torch.as_tensor(half.select(view, generator), dtype=torch.int64).cpu()
        expected = self._chosen_count  # this step's count so far (every node of a step selects as many)
        if chosen.ndim != 1 or (expected is not None and len(chosen) != expected) or len(chosen) == 0 \
                or len(torch.unique(chosen)) != len(chosen) or chosen.min() < 0 or chosen.max() >= len(indices) \
                or not bool((chosen[1:] > chosen[:-1]).all()):
            raise ValueError(f"plugin {name!r} chose rows {chosen.reshape(-1).tolist()[:8]} of virtual node {vnode_id}'s batch of "
                             f"{len(indices)} at step {step}; select must return distinct rows, ascending, as many "
                             "for every node")
        self._chosen_count = len(chosen)
        return chosen

    def _see(self, views: list[SampleBatch], step: int, vnode_id: int, position: int, per_sample: torch.Tensor,
             outputs: Any, targets: Any, inputs: Optional[dict[str, SampleColumns]],
             chosen: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Show one node's samples (``chosen``: the rows it trains on) to the plugins' worker halves;
        mutators may replace its loss."""
        indices = torch.tensor(self.sampler.indices(step, vnode_id), dtype=torch.int64)
        if chosen is not None:
            indices = indices[chosen]
        view = SampleBatch("train", step, vnode_id, indices, per_sample.detach(), _detach(outputs), targets)
        views.append(view)
        for name, changes_loss, half in self.halves:
            if not changes_loss:
                continue
            rows = self._plan_rows(name, step, vnode_id, position, inputs, indices, chosen)
            per_sample = half.loss(dataclasses.replace(view, inputs=rows), per_sample, outputs)
        return per_sample

    def _reports(self, views: list[SampleBatch]) -> dict[str, SampleColumns]:
        if not views:
            return {}
        reports = {}
        for name, _, half in self.halves:
            report = half.report(views)
            if report is not None:
                reports[name] = report
        return reports

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode under ``no_grad``; on the way out, train mode and every random stream (torch's,
        Python's, NumPy's) as they were."""
        devices = [self.device] if self.device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self.model.eval()
                yield
        finally:
            self.model.train()
            random.setstate(py_state)
            np.random.set_state(np_state)

    def evaluate(self, step: int, vnodes: Iterable[int]) -> dict[str, SampleColumns]:
        """The evaluation pass of these virtual nodes' shards with the weights of ``step``: node
        ``v`` evaluates samples ``v, v + N, ...`` in batches of ``eval_batch_size``, in eval mode,
        under ``no_grad``. Running statistics and every random stream are left as they were."""
        spec, n = self.spec, self.spec.virtual_nodes
        size = len(self.loader.dataset)
        parts: dict[str, list[SampleColumns]] = {name: [] for name, _, _ in self.halves}
        with self._evaluating():
            for vnode_id in vnodes:
                shard = torch.arange(vnode_id, size, n, dtype=torch.int64)
                for start in range(0, len(shard), self.eval_batch_size):
                    indices = shard[start:start + self.eval_batch_size]
                    seed_everything(vnode_seed(spec.seed, step, vnode_id, EVAL_STREAM), self.device)
                    batch = self.loader.load(indices.tolist())
                    inputs, targets = move_batch(batch, self.device, self.float_dtype)
                    outputs, per_sample = self._per_sample(inputs, targets)
                    view = SampleBatch("eval", step, vnode_id, indices, per_sample, outputs, targets)
                    for name, _, half in self.halves:
                        parts[name].append(half.report([view]))
        return {name: SampleColumns.concat(p) for name, p in parts.items() if any(x is not None for x in p)}

    def evaluate_job(self, step: int, vnodes: Iterable[int]) -> dict[int, tuple[int, dict[str, float]]]:
        """The job's evaluation (``JobSpec.eval_dataset``) of these virtual nodes' shards with the
        weights of ``step``: node ``v`` takes samples ``v, v + N, ...`` in batches of
        ``vnode_batch_size``, in eval mode under ``no_grad``, with its own seeded stream (running
        statistics and the training streams are left as they were). Returns, per node, its sample
        count and the float64 sum of each metric over its samples: a function of the node and the
        weights alone, which the master adds up in node order (the same value on any worker count).

        Raises:
            InvalidJobSpec: a metric is not one value per sample, or ``lr_scheduler_metric`` is none of them.
            JobCodeError: the evaluation dataset's or metrics' code raised.
        """
        spec, n, b = self.spec, self.spec.virtual_nodes, self.spec.vnode_batch_size
        dataset = self._evaluation_dataset()
        collate = spec.collate_fn or default_collate
        out: dict[int, tuple[int, dict[str, float]]] = {}
        with self._evaluating():
            for vnode_id in vnodes:
                shard = list(range(vnode_id, len(dataset), n))
                count, sums = 0, {}
                for start in range(0, len(shard), b):
                    indices = shard[start:start + b]
                    seed_everything(vnode_seed(spec.seed, step, vnode_id, EVAL_STREAM), self.device)
                    items = [call_job_code("eval_dataset's __getitem__", dataset.__getitem__, i) for i in indices]
                    batch = call_job_code("collate_fn (evaluation)", collate, items)
                    try:
                        inputs, targets = self._split(move_batch(batch, self.device, self.float_dtype))
                    except (TypeError, ValueError):
                        raise InvalidJobSpec("eval_dataset", "items must be (input, target) pairs (as the training "
                                             "set's), or pass step_fn for batches of any shape") from None
                    for name, values in self._eval_metrics(inputs, targets).items():
                        if name == "step":
                            raise InvalidJobSpec("eval_metrics", "'step' names the evaluated step; call the metric "
                                                 "something else")
                        if not isinstance(values, torch.Tensor) or values.shape != (len(indices),):
                            shape = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                            raise InvalidJobSpec("eval_metrics", f"metric {name!r} must hold one value per sample "
                                                 f"(shape [{len(indices)}]), got {shape}")
                        sums[name] = sums.get(name, 0.0) + float(values.detach().double().sum())
                    count += len(indices)
                watched = spec.lr_scheduler_metric
                if watched is not None and sums and watched not in sums:
                    raise InvalidJobSpec("lr_scheduler_metric", f"{watched!r} is not an evaluation metric; the "
                                         f"evaluation computes {sorted(sums)}")
                out[vnode_id] = (count, sums)
        return out

    def _eval_metrics(self, inputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        spec = self.spec
        if spec.eval_metrics is None:
            return {"loss": self._per_sample(inputs, targets)[1]}
        with autocast(spec.precision, self.device):
            if spec.step_fn is not None:
                metrics = call_job_code("eval_metrics", spec.eval_metrics, self.model, inputs)
            else:
                metrics = call_job_code("eval_metrics", spec.eval_metrics, self.model(inputs), targets)
        if not isinstance(metrics, dict) or not metrics:
            raise InvalidJobSpec("eval_metrics", f"must return a dict of name -> per-sample values, got "
                                 f"{type(metrics).__name__}")
        return metrics

    def _evaluation_dataset(self) -> Any:
        if getattr(self, "_eval_dataset", None) is None:
            dataset = call_job_code("eval_dataset builder", self.spec.eval_dataset)
            try:
                size = len(dataset)
            except TypeError:
                raise InvalidJobSpec("eval_dataset", f"must build a map-style dataset with __len__, got "
                                     f"{type(dataset).__name__}") from None
            if size < self.spec.virtual_nodes:
                raise InvalidJobSpec("eval_dataset", f"holds {size} samples, fewer than the {self.spec.virtual_nodes} "
                                     "virtual nodes it is shared among")
            self._eval_dataset = dataset
        return self._eval_dataset

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
        metrics = [self._metric_sum] if self._metric_sum is not None else []
        return StepPartial(step, grads + (buffer_sum or []) + metrics + [loss_sum], [], vnode_losses_f, used)

    def _compute_fused(self, step: int, batches: list[tuple[BatchKey, Any]],
                       inputs: Optional[dict[str, SampleColumns]] = None) -> StepPartial:
        """Fused execution: groups of virtual nodes as one batch. When an attempt fails, ``decide``
        (pure; its table is in ``fused/fallback.py``) says what runs instead: smaller groups, redone
        and remembered (out of memory, or a module that cannot place the group's samples), sequential
        execution from this step on (anything else fusion cannot do), or an error. This loop is the
        one place that applies a decision."""
        while True:
            size = group_size_for(self.group_size, len(batches))
            try:
                return self._compute_groups(step, batches, size, inputs)
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
                    return self.compute(step, batches, inputs)
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

    def _compute_groups(self, step: int, batches: list[tuple[BatchKey, Any]], size: int,
                        inputs: Optional[dict[str, SampleColumns]] = None) -> StepPartial:
        spec, n, ctx = self.spec, self.spec.virtual_nodes, self.fusion
        views: list[SampleBatch] = []
        buffer_sum: Optional[list[torch.Tensor]] = None
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        vnode_losses: dict[int, torch.Tensor] = {}
        grad_sum: Optional[list[Optional[torch.Tensor]]] = None  # CUDA graphs: the groups' gradients
        for p in self.params:
            p.grad = None
        self._chosen_count = None
        self._metric_sum = None
        self.stats.begin_step()
        for start in range(0, len(batches), size):
            group = batches[start:start + size]
            vnode_ids = [key[1] for key, _ in group]
            if any(key[0] != step for key, _ in group):
                raise ValueError(f"a batch of another step arrived during step {step}")
            self.stats.restore()
            chosen: dict[int, torch.Tensor] = {}
            if self.selector is not None:  # each node's choice, from its own scoring forward (not fused)
                picked = []
                for k, (key, batch) in enumerate(group):
                    x, y = move_batch(batch, self.device, self.float_dtype)
                    chosen[key[1]] = self._select(step, key[1], start + k, x, y, inputs)
                    picked.append((key, take_rows(batch, chosen[key[1]])))
                group = picked
            inputs_g, targets = self._split(move_batch(interleave_batches([b for _, b in group]), self.device,
                                                       self.float_dtype))
            self.emit(Event.BATCH_LOADED, step, len(group))
            ctx.groups, ctx.rows = len(group), leading_rows(inputs_g)
            weights = [self.stats.weight(v) for v in vnode_ids]
            ctx.weights = torch.tensor(weights, dtype=torch.float64).to(self.device, non_blocking=True)
            ctx.stat_sums = {}
            try:
                if self.graphs is not None:
                    self.emit(Event.LOSS_COMPUTED, step, len(group))
                    means, grads, ctx.stat_sums = self.graphs.run(inputs_g, targets, ctx.weights, len(group),
                                                                  self.stats.restore)
                    means = means.clone()  # the graph's memory: the next replay overwrites it
                    grad_sum = _add_grads(grad_sum, grads)
                else:
                    ctx.generators = [torch.Generator(self.device).manual_seed(
                        vnode_seed(spec.seed, step, v, MODEL_STREAM)) for v in vnode_ids]
                    before = default_generator_states(self.device)
                    see = None
                    if self.halves:
                        def see(per_sample, outputs, targets, start=start, vnode_ids=vnode_ids, chosen=chosen):
                            return self._see_group(views, step, vnode_ids, start, per_sample, outputs, targets,
                                                   inputs, chosen)
                    means = self._group_forward_backward(inputs_g, targets, len(group), step, see)
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
        partial = self._finish(step, vnode_losses, buffer_sum, loss_sum, [False] * len(self.params), TreeReducer())
        partial.reports = self._reports(views)
        return partial

    def _see_group(self, views: list[SampleBatch], step: int, vnode_ids: list[int], start: int,
                   per_sample: torch.Tensor, outputs: Any, targets: Any,
                   inputs: Optional[dict[str, SampleColumns]],
                   chosen: Optional[dict[int, torch.Tensor]] = None) -> torch.Tensor:
        """``_see`` for a fused group, whose rows are interleaved (row ``i * G + k``: sample ``i`` of
        the group's ``k``-th node)."""
        groups = len(vnode_ids)
        columns = []
        for k, vnode_id in enumerate(vnode_ids):
            rows = slice(k, None, groups)
            node_outputs = outputs[rows] if isinstance(outputs, torch.Tensor) else outputs
            node_targets = targets[rows] if isinstance(targets, torch.Tensor) else targets
            columns.append(self._see(views, step, vnode_id, start + k, per_sample[rows], node_outputs,
                                     node_targets, inputs, (chosen or {}).get(vnode_id)))
        return torch.stack(columns, dim=1).flatten()

    def _group_forward_backward(self, inputs: Any, targets: Any, groups: int, step: int = -1,
                                see: Optional[Callable] = None) -> torch.Tensor:
        """Forward, loss and backward of one fused group; returns each node's mean loss. Also what a
        CUDA graph captures (``graphs.py``). ``see``: shows the samples to plugins (``_see_group``)."""
        outputs, per_sample = self._per_sample(inputs, targets)
        if not self._loss_checked:
            self._check_per_sample(per_sample, self._rows(inputs, targets))
        self.emit(Event.LOSS_COMPUTED, step, groups)
        if see is not None:
            per_sample = see(per_sample, outputs, targets)
        means = segment_means(per_sample, groups)  # each node's mean loss (rows are interleaved)
        self._add_metrics(self._metric_share(groups))
        self.fusion.in_backward = True  # a patched module running now is recomputed (checkpointing)
        try:
            self._backward(means.sum() / self.spec.virtual_nodes)
        finally:
            self.fusion.in_backward = False
        self.emit(Event.BACKWARD_DONE, step, groups)
        return means.detach()

    def prepare(self, total: Payload, used: list[bool]) -> StepMetrics:
        """Read the reduced gradient before the step is committed: unscale it (fp16: an overflow
        found), and take its global 2-norm. Every worker holds the same ``total``, so every worker
        gets the same answer; only ``total`` changes, which an aborted step discards."""
        grads = [g for g, was_used in zip(total[:len(self.params)], used) if was_used]
        skipped = self.scaler.unscale_(grads, self.spec.virtual_nodes) if self.scaler is not None else False
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        values = dict(zip(self.metric_names, total[-2].tolist())) if self.metric_names else {}
        return StepMetrics(grad_norm=float(norm), skipped=skipped, lr=float(self.optimizer.param_groups[0]["lr"]),
                           values=values, norm=norm)

    def apply(self, total: Payload, used: list[bool], metrics: Optional[StepMetrics] = None,
              evaluation: Optional[dict] = None) -> float:
        """Install the reduced gradients and running stats, then, as DDP with the job's settings
        would: clip the gradient to ``clip_grad_norm``, step the optimizer (not on an fp16
        overflow), update the loss scale, step the scheduler. ``evaluation``: the job's evaluation
        this step carried (of the weights it started from), which a scheduler stepping on a metric
        (``lr_scheduler_metric``) steps on first. Returns the step's loss. ``metrics``: what
        ``prepare`` said of ``total`` (prepared here when None)."""
        if metrics is None:
            metrics = self.prepare(total, used)
        if evaluation is not None:
            self.evaluated(evaluation)
        n_params, n_bufs = len(self.params), len(self.stats.float_buffers)
        for p, grad, was_used in zip(self.params, total[:n_params], used):
            p.grad = grad if was_used else None  # unused everywhere: the optimizer skips it, as in DDP
        self.stats.finish_step(total[n_params:n_params + n_bufs])
        if not metrics.skipped:
            if self.spec.clip_grad_norm is not None:
                grads = [p for p in self.params if p.grad is not None]
                norm = metrics.norm if metrics.norm is not None else torch.tensor(metrics.grad_norm)
                torch.nn.utils.clip_grads_with_norm_(grads, self.spec.clip_grad_norm, norm)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if self.lr_scheduler is not None and self.spec.lr_scheduler_metric is None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total[-1].item())

    def evaluated(self, evaluation: dict) -> None:
        """The job's evaluation of the current weights is known (the master's, the same on every
        worker): a scheduler that steps on one of its metrics (``lr_scheduler_metric``) steps now,
        before the next optimizer step, as ``scheduler.step(evaluate())`` at the top of a DDP loop.
        ``apply`` calls it for a step's evaluation; the agent, for the one after the last step."""
        if self.lr_scheduler is None or self.spec.lr_scheduler_metric is None:
            return
        if evaluation["step"] > self.scheduler_evaluated:  # once per evaluation, also across a resume
            self.lr_scheduler.step(evaluation[self.spec.lr_scheduler_metric])
            self.scheduler_evaluated = evaluation["step"]

    def _split(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a moved batch; with ``step_fn`` the whole batch is the input."""
        if self.spec.step_fn is not None:
            return batch, None
        inputs, targets = batch
        return inputs, targets

    def _per_sample(self, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor]:
        """``(outputs, per-sample loss)`` of one batch under the job's precision: the model's outputs
        and ``loss(outputs, targets)``, or (None, ``step_fn(model, batch)``)."""
        with autocast(self.spec.precision, self.device):
            if self.spec.step_fn is not None:
                return None, self._step_output(self.spec.step_fn(self.model, inputs))
            outputs = self.model(inputs)
            return outputs, self.spec.loss(outputs, targets)

    def _step_output(self, result: Any) -> Any:
        """``step_fn``'s per-sample loss. It may also return per-sample metrics, ``(loss, {name:
        Tensor[b]})``: kept for ``_metric_share``, with the same names at every call.

        Raises:
            InvalidJobSpec: a tuple that is not ``(loss, dict)``, other names than before, or a
                metric that is not one value per sample.
        """
        if not isinstance(result, tuple):
            if self.metric_names:
                raise InvalidJobSpec("step_fn", f"returned no metrics after returning {list(self.metric_names)}; "
                                     "return the same metrics at every call")
            self._metrics = None
            return result
        if len(result) != 2 or not isinstance(result[1], dict) or not result[1]:
            raise InvalidJobSpec("step_fn", "must return the per-sample loss, or (loss, metrics) with metrics a "
                                 "non-empty dict of name -> per-sample values")
        loss, metrics = result
        names = tuple(sorted(metrics))
        if self.metric_names is not None and names != self.metric_names:
            raise InvalidJobSpec("step_fn", f"returned metrics {list(names)} after {list(self.metric_names)}; "
                                 "return the same metrics at every call")
        rows = loss.shape if isinstance(loss, torch.Tensor) else None
        for name in names:
            value = metrics[name]
            if not isinstance(name, str) or not isinstance(value, torch.Tensor) or value.shape != rows:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidJobSpec("step_fn", f"metric {name!r} must hold one value per sample, as the loss "
                                     f"(shape {list(rows) if rows is not None else '?'}), got {shape}")
        self.metric_names, self._metrics = names, metrics
        return loss

    def _metric_share(self, groups: int) -> Optional[torch.Tensor]:
        """The last forward's ``step_fn`` metrics as this node's (or fused group's ``groups``
        nodes') share of their step means: each node's mean over its samples, over N, in float64;
        one value per metric name. None without metrics."""
        if self._metrics is None:
            return None
        n = self.spec.virtual_nodes
        if groups == 1:
            means = [self._metrics[k].detach().to(torch.float64).mean() for k in self.metric_names]
        else:  # interleaved rows: segment_means gives each node's mean
            means = [segment_means(self._metrics[k].detach().to(torch.float64), groups).sum()
                     for k in self.metric_names]
        return torch.stack(means) / n

    def _add_metrics(self, share: Optional[torch.Tensor]) -> None:
        """Fast mode: add a node's (or fused group's) metric share to this step's sum."""
        if share is not None:
            self._metric_sum = share if self._metric_sum is None else self._metric_sum + share

    def _backward(self, share: torch.Tensor) -> None:
        """Backward of a node's (or a fused group's) share of the global loss (its mean loss over N).
        fp16: of its mean loss times the scale, as a DDP rank's scaled backward runs, so that fp16
        activations overflow where they would under DDP; ``prepare`` divides by N with the scale."""
        if self.scaler is None:
            share.backward()
        else:
            (share * (self.scaler.scale * self.spec.virtual_nodes)).backward()

    def _rows(self, inputs: Any, targets: Any) -> int:
        """The samples in a batch: its targets' length, or (``step_fn``) its first tensor's rows."""
        return len(targets) if hasattr(targets, "__len__") else leading_rows(inputs)

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

    def _check_per_sample(self, per_sample: Any, expected: int) -> None:
        if not isinstance(per_sample, torch.Tensor) or per_sample.shape != (expected,):
            shape = list(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise InvalidJobSpec(
                "step_fn" if self.spec.step_fn is not None else "loss",
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
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "scheduler_evaluated": self.scheduler_evaluated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("grad_scaler") is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.scheduler_evaluated = state.get("scheduler_evaluated", -1)


def _no_subscriber(event: Event, step: int, work: int = 1) -> None:
    pass


def _detach(outputs: Any) -> Any:
    return outputs.detach() if isinstance(outputs, torch.Tensor) else outputs


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
