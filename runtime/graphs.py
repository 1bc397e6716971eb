"""CUDA-graph replay of a fused group's forward and backward (``JobSpec(cuda_graphs=True)``).

Small virtual nodes leave a GPU idle between kernel launches. Where every group of a step has the
same shapes, the group's whole forward, loss and backward are captured once into a CUDA graph and
replayed: one launch per group instead of hundreds. Per shape (group size, input and target shapes)
one graph is captured, after a short warm-up on a side stream; all graphs share one memory pool.

What a replay reads and writes lives in static tensors: the inputs, the targets and the per-segment
running-statistics weights are copied in before each replay; the per-node mean losses, the
parameter gradients and the BatchNorm statistic sums come out in the graph's own memory and are
copied (or added) out before the next replay overwrites them. Running buffers are updated in place,
as in eager execution, and the engine restores them between groups exactly as it does without
graphs, so the math is that of fused execution.

Not capturable, and refused before any work (``unsupported_reason``): a CPU device, Dropout or
attention dropout above 0 (per-node generators are re-seeded every step), BatchNorm with
``momentum=None`` (its cumulative average reads a counter on the host), and batches that are not a
pair of tensors.

``benchmarks/gpu.py`` checks it against eager fused execution (gradients, losses, buffers) in
float64 before timing it; on an H200 with torch 2.11 they agree within 5e-15 (README).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fused import FusionContext

WARMUP_ITERATIONS = 3
GRAPHS_KEPT = 3  # shapes change when a re-form changes a worker's node count: keep the newest few


def unsupported_reason(model: nn.Module, device: torch.device) -> Optional[str]:
    """Why this model cannot be replayed from CUDA graphs on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and this job runs on {device}; set cuda_graphs=False"
    for name, module in model.named_modules():
        p = module.p if isinstance(module, nn.Dropout) else \
            module.dropout if isinstance(module, nn.MultiheadAttention) else 0.0
        if p > 0:
            return (f"module {name!r} is {type(module).__name__} with dropout {p}: its per-node random streams are "
                    "re-seeded every step, which a captured graph cannot follow; set cuda_graphs=False")
        if isinstance(module, _BatchNorm) and module.momentum is None:
            return (f"module {name!r} is BatchNorm with momentum=None (a cumulative average computed on the "
                    "host); give it a momentum or set cuda_graphs=False")
    return None


@dataclasses.dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    means: torch.Tensor
    grads: list[Optional[torch.Tensor]]
    stat_sums: dict[int, list[torch.Tensor]]


class GroupGraphs:
    """Captured graphs of one engine, one per group shape."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor], ctx: FusionContext,
                 forward_backward: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]):
        self.model = model
        self.params = params
        self.ctx = ctx
        self.forward_backward = forward_backward  # (inputs, targets, groups) -> per-node means
        self._graphs: collections.OrderedDict[tuple, _Captured] = collections.OrderedDict()  # LRU
        self._pool = None

    def clear(self) -> None:
        """Forget every graph (and its memory), e.g. after an out-of-memory error."""
        self._graphs.clear()
        self._pool = None

    def run(self, inputs: Any, targets: Any, weights: torch.Tensor, groups: int,
            restore: Callable[[], None]) -> tuple[torch.Tensor, list[Optional[torch.Tensor]], dict]:
        """One group: ``(means, gradients, BatchNorm statistic sums)``, all in graph memory (copy
        or add them out before the next call). ``restore`` puts the running buffers back after a
        capture's warm-up iterations."""
        if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
            raise TypeError(f"cuda_graphs needs batches of (inputs, targets) tensors, got "
                            f"({type(inputs).__name__}, {type(targets).__name__}); set cuda_graphs=False")
        key = (groups, tuple(inputs.shape), inputs.dtype, tuple(targets.shape), targets.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= GRAPHS_KEPT:
                self._graphs.popitem(last=False)
            entry = self._graphs[key] = self._capture(inputs, targets, weights, groups)
            restore()
        self._graphs.move_to_end(key)
        entry.inputs.copy_(inputs)
        entry.targets.copy_(targets)
        entry.weights.copy_(weights)
        self.ctx.weights, self.ctx.groups = entry.weights, groups
        entry.graph.replay()
        return entry.means, entry.grads, entry.stat_sums

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 groups: int) -> _Captured:
        static_in, static_t, static_w = inputs.clone(), targets.clone(), weights.clone()
        self.ctx.weights, self.ctx.groups = static_w, groups
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning, lazy allocations, autograd state
            for _ in range(WARMUP_ITERATIONS):
                self._reset()
                self.forward_backward(static_in, static_t, groups)
        torch.cuda.current_stream().wait_stream(side)
        self._reset()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a pin-memory thread of the data loader) do not
        # break this capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            means = self.forward_backward(static_in, static_t, groups)
        return self._captured(graph, static_in, static_t, static_w, means)

    def _captured(self, graph, static_in, static_t, static_w, means) -> _Captured:
        grads = [p.grad for p in self.params]
        stat_sums = self.ctx.stat_sums
        self._reset()  # what stays is the graph's memory, which each replay rewrites
        return _Captured(graph, static_in, static_t, static_w, means, grads, stat_sums)

    def _reset(self) -> None:
        for p in self.params:
            p.grad = None
        self.ctx.stat_sums = {}
