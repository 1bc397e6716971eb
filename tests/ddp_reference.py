"""An independent reference: real ``DistributedDataParallel`` over N gloo processes on this CPU.

Written the way a user writes DDP (DistributedSampler, DataLoader(drop_last=True), set_epoch), with
two additions that the vnodes contract documents: rank r seeds its forward pass with
``vnode_seed(seed, step, r)``, and under the ``"mean"`` running-stats policy the BatchNorm buffers are
averaged over ranks after each step (``broadcast_buffers=False``). Under ``"vnode0"``, DDP's default
``broadcast_buffers=True`` is used unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import tempfile

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from vnodes.runtime import JobSpec, vnode_seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, spec: JobSpec, steps: int, out: str, record: bool = False,
               hooks=None) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = spec.dataset()
        torch.manual_seed(spec.seed)
        model = spec.model()
        mean_policy = spec.running_stats == "mean"
        ddp = DistributedDataParallel(model, broadcast_buffers=not mean_policy)
        optimizer = spec.optimizer(spec.param_groups(model) if spec.param_groups else ddp.parameters())
        # precision: autocast around forward and loss; fp16 with a GradScaler on every rank
        autocast = (contextlib.nullcontext if spec.precision == "fp32" else
                    functools.partial(torch.autocast, "cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[
                        spec.precision]))
        scaler = torch.amp.GradScaler("cpu", **(spec.grad_scaler or {})) if spec.precision == "fp16" else None
        scheduler = spec.lr_scheduler(optimizer) if spec.lr_scheduler else None
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=spec.seed, drop_last=True)
        loader = DataLoader(dataset, batch_size=spec.vnode_batch_size, sampler=sampler, drop_last=True,
                            collate_fn=spec.collate_fn)
        dtype = next(model.parameters()).dtype
        running = [b for m in model.modules() if isinstance(m, _NormBase)
                   for b in m.buffers(recurse=False) if b.is_floating_point()]
        step, epoch, losses, grad_norms, skipped, lrs, metrics = 0, 0, [], [], [], [], []
        seen = []  # record: (epoch, dataset indices, per-sample losses) of this rank's batches
        evaluated = []  # record: per epoch, rank 0's evaluation of every sample (loss, true prob, margin)
        while step < steps:
            sampler.set_epoch(epoch)
            order = list(iter(sampler))
            for k, batch in enumerate(loader):
                if step == steps:
                    break
                if spec.lr_scheduler_metric and step > 0 and step % spec.eval_every == 0:
                    # ReduceLROnPlateau: scheduler.step(evaluate()) at the top of the loop
                    scheduler.step(_evaluate_metric(model, spec, dtype, autocast))
                lrs.append(optimizer.param_groups[0]["lr"])
                if spec.step_fn is not None:  # any batch: step_fn(model, batch) -> per-sample loss
                    torch.manual_seed(vnode_seed(spec.seed, step, rank))
                    with autocast():
                        per_sample = spec.step_fn(ddp, _to_dtype(batch, dtype))
                    if isinstance(per_sample, tuple):  # (loss, per-sample metrics): each rank's mean, averaged
                        per_sample, values = per_sample
                        means = torch.stack([values[k].detach().double().mean() for k in sorted(values)])
                        dist.all_reduce(means)
                        metrics.append(dict(zip(sorted(values), (means / world).tolist())))
                else:
                    x, y = batch
                    b = spec.vnode_batch_size
                    indices = torch.tensor(order[k * b:(k + 1) * b])
                    if hooks and hooks.select:  # the rows this rank trains on, from its own scoring forward
                        rows = hooks.select(model, x.to(dtype), y, spec, step, rank)
                        x, y, indices = x[rows], y[rows], indices[rows]
                    torch.manual_seed(vnode_seed(spec.seed, step, rank))
                    with autocast():
                        outputs = ddp(x.to(dtype))
                        per_sample = spec.loss(outputs, y)
                    if hooks and hooks.loss:
                        per_sample = hooks.loss(per_sample, outputs, indices, step)
                    if record:
                        seen.append((epoch, indices, per_sample.detach().clone()))
                loss = per_sample.mean()
                optimizer.zero_grad()
                _backward_and_step(loss, ddp, optimizer, scaler, spec, grad_norms, skipped)
                if scheduler and not spec.lr_scheduler_metric:
                    scheduler.step()
                if mean_policy:
                    for b in running:
                        dist.all_reduce(b)
                        b /= world
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                losses.append(mean_loss.item() / world)
                step += 1
            if record and step % len(loader) == 0 and rank == 0:
                evaluated.append(_evaluate(model, dataset, dtype))
            epoch += 1
        result = {"model": model.state_dict(), "losses": losses, "grad_norms": grad_norms, "skipped": skipped,
                  "lrs": lrs, "metrics": metrics}
        if record:
            every = [None] * world
            dist.all_gather_object(every, seen)
            if rank == 0:
                result["dynamics"] = _tables(every, len(dataset), step // len(loader), evaluated)
        if rank == 0:
            torch.save(result, out)
        # Every rank leaves together: gloo can abort a process that tears its group down while a
        # peer is still using its connections ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _evaluate_metric(model, spec: JobSpec, dtype, autocast) -> float:
    """The mean of ``spec.lr_scheduler_metric`` over the whole evaluation set, in eval mode under
    ``no_grad``, in float64 (every rank computes the same value)."""
    was_training = model.training
    model.eval()
    data = spec.eval_dataset()
    x = torch.stack([data[i][0] for i in range(len(data))]).to(dtype)
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    with torch.no_grad(), autocast():
        outputs = model(x)
        metrics = spec.eval_metrics(outputs, y) if spec.eval_metrics else {"loss": spec.loss(outputs, y)}
    model.train(was_training)
    return float(metrics[spec.lr_scheduler_metric].double().mean())


def _to_dtype(batch, dtype):
    """Floating tensors in the model's dtype, as vnodes moves a batch."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_dtype(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_dtype(v, dtype) for v in batch)
    return batch


def _backward_and_step(loss, ddp, optimizer, scaler, spec, grad_norms, skipped) -> None:
    """What a DDP user writes with a GradScaler and clip_grad_norm_: scale, backward (DDP averages),
    unscale, clip (the norm recorded), step unless the scaler found an overflow, update."""
    params = [p for p in ddp.parameters() if p.grad is not None or p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if spec.clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], spec.clip_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    grad_norms.append(float(norm))
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
    else:
        optimizer.step()
        skipped.append(False)


def _evaluate(model, dataset, dtype) -> dict:
    """Every sample once, in eval mode, in one batch: per-sample loss, true-class probability, margin."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(dtype)
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        probs = logits.softmax(dim=1)
        true = probs[torch.arange(len(y)), y]
        others = probs.clone()
        others[torch.arange(len(y)), y] = -1.0
        margin = true - others.max(dim=1).values
    model.train(was_training)
    return {"loss": loss.float(), "true_prob": true.float(), "margin": margin.float()}


def _tables(every: list, num_samples: int, epochs: int, evaluated: list) -> dict:
    """``{"train": [num_samples, epochs] per-sample losses when seen (NaN: not seen), "eval": {signal: table}}``."""
    train = torch.full((num_samples, epochs), float("nan"))
    for seen in every:
        for epoch, indices, per_sample in seen:
            if epoch < epochs:
                train[indices, epoch] = per_sample.float()
    evals = {name: torch.stack([e[name] for e in evaluated], dim=1) for name in ("loss", "true_prob", "margin")} \
        if evaluated else {}
    return {"train": train, "eval": evals}


@dataclasses.dataclass
class Hooks:
    """What a user adds to a DDP loop for a plugin's math (picklable functions):
    ``select(model, x, y, spec, step, rank) -> rows`` picks the rows a rank trains on;
    ``loss(per_sample, outputs, indices, step) -> per_sample`` replaces the per-sample loss."""

    select: Optional[Callable] = None
    loss: Optional[Callable] = None


def run_ddp(spec: JobSpec, steps: int, record: bool = False, hooks: Optional[Hooks] = None) -> dict:
    """Train ``spec`` with ``virtual_nodes`` real DDP processes; return rank 0's state and losses
    (and with ``record``, the per-sample dynamics a recorder would record: ``_tables``). ``spec.plugins``
    are ignored: ``hooks`` carry what a plugin changes, written here the way a DDP user would."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.start_processes(_rank_main, args=(spec.virtual_nodes, free_port(), spec, steps, out, record, hooks),
                           nprocs=spec.virtual_nodes, join=True, start_method="spawn")
        return torch.load(out, weights_only=True)
