"""Where a group's samples are: the interleaved batch, and where they lie in a patched module's input.

A group of G virtual nodes runs as one batch of ``G * b`` samples, *interleaved*: sample ``i`` of node
``k`` of the group is row ``i * G + k`` (``interleave_batches``). In a patched module's input the
samples lie where ``locate_rows`` finds them; a shape it cannot read raises ``LayoutUnknown``.
"""

from __future__ import annotations

import torch
from torch import nn

from .context import FusionContext
from .fallback import LayoutUnknown
from .strides import dense_like

LAYOUTS = ("batch-first", "flattened", "sequence-first")  # the values of a module's ``vnodes_layout``


def locate_rows(x: torch.Tensor, ctx: FusionContext, module: nn.Module,
                sequence_first: bool = True) -> tuple[int, int]:
    """Where the group's N samples lie in ``x``: ``(dimension, consecutive entries per sample in it)``.

    A module's ``vnodes_layout`` says it: ``"batch-first"`` (dimension 0: the N samples, or whole
    batches concatenated along it, e.g. two views in contrastive learning), ``"flattened"``
    (dimension 0: each sample's rows together, e.g. ``x.reshape(N * L, E)``) or ``"sequence-first"``
    (dimension 1 of ``(L, N, E)``). Inside a transformer layer its ``batch_first`` says it. Else the
    shape must allow exactly one reading: dimension 0 of size N, or dimension 1 of size N of a 3-D
    tensor; anything else raises ``LayoutUnknown`` (the engine then runs smaller groups). With one
    node in the group, all of ``x`` is its own.
    """
    rows = ctx.rows
    if ctx.groups == 1 and x.dim() >= 1:
        return 0, 1  # one node: all of the tensor is its own, wherever its samples lie
    layout = getattr(module, "vnodes_layout", None)
    if layout is not None:
        if layout == "sequence-first" and x.dim() >= 2 and x.shape[1] == rows:
            return 1, 1
        if layout != "sequence-first" and x.dim() >= 1 and x.shape[0] % rows == 0 and x.shape[0] > 0:
            return 0, (1 if layout == "batch-first" else x.shape[0] // rows)
        raise LayoutUnknown(f"{type(module).__name__} with vnodes_layout={layout!r} got an input of shape "
                            f"{list(x.shape)} for a group of {rows} samples; check that layout")
    first = x.dim() >= 1 and x.shape[0] == rows
    second = sequence_first and x.dim() == 3 and x.shape[1] == rows
    if ctx.batch_dim is not None and (first, second)[ctx.batch_dim]:  # inside a layer that says where it is
        return ctx.batch_dim, 1
    if first != second:
        return (0, 1) if first else (1, 1)
    readings = "dimension 0 or 1 could hold them" if first else "no dimension holds exactly them"
    raise LayoutUnknown(
        f"{type(module).__name__} got an input of shape {list(x.shape)} for a group of {rows} samples: {readings}. "
        "If the model is right for fused execution, set `vnodes_layout` on that module to 'batch-first' "
        "(dimension 0 holds the samples, or whole batches concatenated along it), 'flattened' (each "
        "sample's rows together, as x.reshape(N * L, ...) gives)" + (" or 'sequence-first' (dimension 1)"
                                                                       if sequence_first else ""), ambiguous=first)


def segments_of(x: torch.Tensor, dim: int, inner: int, g: int) -> list[torch.Tensor]:
    """Each node's part of ``x`` (views), dimension ``dim`` split into (its samples, ``inner``).

    One ``unbind``: its backward gathers the parts' gradients in one pass (a ``select`` per part
    would make a zero-filled full-size gradient for each part and add the G of them)."""
    return list(x.unflatten(dim, (-1, g, inner)).unbind(dim + 1))


def interleave_like(segments: list[torch.Tensor], dim: int, inner: int) -> torch.Tensor:
    """Interleave per-segment results along ``dim`` (``inner`` entries per sample) into the memory
    layout the segments have (the layout one call on the whole group would give): later layers,
    Dropout among them, see each segment laid out as in sequential execution. Backward hands each
    segment its rows of the gradient: one pass, whatever G."""
    return _Interleave.apply(dim, inner, *segments)


class _Interleave(torch.autograd.Function):
    """``interleave_like`` with a backward of one pass (copies into views of one output would give
    each segment a full-size masked copy of the gradient)."""

    @staticmethod
    def forward(ctx, dim: int, inner: int, *segments: torch.Tensor) -> torch.Tensor:
        first, g = segments[0], len(segments)
        shape = list(first.shape)
        shape[dim] *= g
        out = dense_like(first, shape)
        rows = out.unflatten(dim, (-1, g, inner))
        for k, segment in enumerate(segments):
            rows.select(dim + 1, k).copy_(segment.unflatten(dim, (-1, inner)))
        ctx.dim, ctx.inner, ctx.g = dim, inner, g
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = grad.unflatten(ctx.dim, (-1, ctx.g, ctx.inner)).unbind(ctx.dim + 1)
        return (None, None, *(part.flatten(ctx.dim, ctx.dim + 1) for part in parts))


def interleave_batches(batches: list):
    """One batch from G virtual-node batches of b samples each: row ``i * G + k`` is sample ``i`` of
    batch ``k`` (tensors, and tuples, lists and dicts of them). One copy, like a concatenation."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if any(t.shape != first.shape for t in batches):
            raise ValueError("fused execution needs virtual-node batches of one shape, got "
                             f"{sorted({tuple(t.shape) for t in batches})}; pad them in collate_fn "
                             "or use execution='sequential'")
        return torch.stack(batches, dim=1).flatten(0, 1)
    if isinstance(first, (list, tuple)):
        return type(first)(interleave_batches([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: interleave_batches([b[k] for b in batches]) for k in first}
    raise TypeError(f"cannot fuse batches of type {type(first).__name__}")


def leading_rows(batch) -> int:
    """Dimension 0 of the first tensor in a (nested) batch: the group's sample count."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        batch = list(batch.values())
    for item in batch:
        try:
            return leading_rows(item)
        except TypeError:
            continue
    raise TypeError("a fused batch holds no tensor")


def segment_means(per_sample: torch.Tensor, groups: int) -> torch.Tensor:
    """Each virtual node's mean of an interleaved per-sample tensor: shape ``[groups]``."""
    return per_sample.reshape(-1, groups).mean(dim=0)
