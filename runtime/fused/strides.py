"""How a tensor lies in memory (density, dimension order, alignment), so that a node's copy of its
rows looks to a kernel as that node's own tensor does in sequential execution."""

from __future__ import annotations

from typing import Optional

import torch

ALIGNMENT = 64  # bytes: fresh allocations are aligned at least this much (CPU: 64, CUDA's caching allocator: 512)


def laid_out_alone(x: torch.Tensor, part: torch.Tensor, dim: int, inner: int) -> torch.Tensor:
    """A copy of one node's rows of ``x`` (``part``: split at ``dim`` into (its samples, ``inner``)),
    laid out as that node's own tensor is in sequential execution, as far as a dropout kernel can see.

    CUDA's fused dropout kernel picks its vector width, and with it which random number lands on
    which element, from whether its input is dense and how its address is aligned. So the copy is
    dense in ``x``'s dimension order if ``x`` is dense, else has ``x``'s strides (non-dense like it;
    for the batch-outermost layouts those are the node's own strides), and starts at ``x``'s
    address modulo ``ALIGNMENT``. (A tensor such as ``h[:, 0]`` or the second half of a ``chunk``
    is non-dense or misaligned alike in both modes, as long as its offset does not depend on the
    batch size.)
    """
    shape = list(x.shape)
    shape[dim] = part.shape[dim] * inner
    if is_dense(x):
        stride = _dense_strides(x, shape)
    elif all(s > 0 or n == 1 for n, s in zip(x.shape, x.stride())):
        stride = list(x.stride())
    else:  # overlapping (expanded): non-dense, with gaps instead
        stride = [2 * s for s in _dense_strides(x, shape)]
    misaligned = x.data_ptr() % ALIGNMENT
    offset = misaligned // x.element_size() if misaligned % x.element_size() == 0 else 0
    extent = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    # detach(): a tensor of its own for autograd (an in-place Dropout then modifies no view of a leaf)
    node = x.new_empty(offset + extent).as_strided(shape, stride, offset).detach()
    return node.copy_(part.flatten(dim, dim + 1))


def alignment_known(x: torch.Tensor, groups: int) -> bool:
    """Whether a node's own tensor in sequential execution surely starts at ``x``'s address modulo
    ``ALIGNMENT``. Only a dense tensor's alignment matters (a GPU's dropout kernel vectorises only
    those), and a dense tensor that does not start its storage is a slice of an outer dimension:
    of the batch, or of one outside it (``(L, N, E)[1:]``, ``qkv.unbind(0)``), whose offset then
    scales with the batch, or one within a single sample's rows. Certain when both agree."""
    offset = x.storage_offset()
    if offset == 0 or not is_dense(x):
        return True
    size = x.element_size()
    start = x.data_ptr() - offset * size
    return offset % groups == 0 and (start + offset * size // groups) % ALIGNMENT == x.data_ptr() % ALIGNMENT


def is_dense(t: torch.Tensor) -> bool:
    """ATen's ``is_non_overlapping_and_dense``: the elements fill a block of memory, each once, in
    some order of the dimensions (size-1 dimensions do not count)."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_strides(t: torch.Tensor, shape: list[int]) -> list[int]:
    """The strides of a dense tensor of ``shape`` whose dimensions lie in memory in the order of ``t``'s."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost first (stable for size-1 dims)
    strides, size = [0] * t.dim(), 1
    for d in reversed(order):
        strides[d], size = size, size * shape[d]
    return strides


def dense_like(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """An empty dense tensor of ``shape`` whose dimensions lie in memory in the order of ``t``'s strides."""
    return t.new_empty_strided(shape, _dense_strides(t, shape))


def channels_last_format(x: torch.Tensor) -> Optional[torch.memory_format]:
    """``channels_last`` (or its 3-D form) if ``x`` is laid out so, else None."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None
