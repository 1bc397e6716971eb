"""The patched modules: BatchNorm, Dropout and MultiheadAttention (and the transformer layers that
hold them) get a forward that, while a group runs (``FusionContext.groups > 0``), treats each virtual
node's segment of the batch as sequential execution treats that node's batch.

- BatchNorm1d/2d/3d compute batch statistics per segment of ``b`` samples, and each segment
  contributes its running-statistics update to the step's policy exactly as in sequential mode;
- Dropout draws each segment's mask from that virtual node's own generator, laid out as the node's
  tensor is in sequential execution: on a CPU as the noise ATen's CPU dropout draws, applied to the
  group in one multiplication; on other devices (CUDA's dropout kernel draws differently) by the very
  ``F.dropout`` call sequential execution makes, once per segment, with the node's generator swapped
  in as the device's default;
- MultiheadAttention with attention dropout: on a CPU, one call on the whole group whose dropout of
  the attention probabilities draws each segment's noise as ATen's CPU attention draws it
  (``randomness.attention_with_node_noise``); on other devices once per segment, with the node's
  generator swapped in. Without dropout it is sample-wise and runs on the whole group.

Only ``forward`` is replaced, on each instance, so parameter and buffer names, and so checkpoints,
stay those of the user's model. Activation checkpointing (a patched module run again during
backward) raises ``FusionUnsupported`` (``_refuse_recomputation``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidJobSpec
from . import randomness
from .context import FusionContext
from .fallback import FusionUnsupported, LayoutUnknown
from .layout import LAYOUTS, interleave_like, locate_rows, segments_of
from .randomness import attention_with_node_noise, default_generator_as
from .strides import alignment_known, channels_last_format, laid_out_alone


def _refuse_recomputation(ctx: FusionContext, module: nn.Module) -> None:
    """Activation checkpointing runs a forward again during backward. Sequential execution then
    replays the default generator, but the nodes' streams here have moved on and a BatchNorm would
    count its statistics twice: refused, so that the engine runs the job sequentially."""
    if ctx.in_backward:
        raise FusionUnsupported(f"{type(module).__name__} ran again during backward (activation checkpointing "
                                "recomputes it): fused execution cannot replay its per-node random streams "
                                "and statistics; keep it outside torch.utils.checkpoint, or use "
                                "execution='sequential'")


def patch_model(model: nn.Module, ctx: FusionContext) -> None:
    """Give BatchNorm, Dropout and MultiheadAttention modules a per-segment forward that reads ``ctx``.

    Raises:
        InvalidJobSpec: a module's ``vnodes_layout`` is not one of ``LAYOUTS`` (or, on a BatchNorm,
            is ``"sequence-first"``).
    """
    for name, module in model.named_modules():
        layout = getattr(module, "vnodes_layout", None)
        allowed = LAYOUTS[:2] if isinstance(module, _BatchNorm) else LAYOUTS
        if layout is not None and layout not in allowed:
            raise InvalidJobSpec("model", f"module {name!r} ({type(module).__name__}) has vnodes_layout={layout!r}; "
                                 f"use one of {', '.join(map(repr, allowed))}")
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.forward = types.MethodType(_make_bn_forward(ctx, type(module).forward), module)
        elif isinstance(module, nn.Dropout):
            module.forward = types.MethodType(_make_dropout_forward(ctx, type(module).forward), module)
        elif isinstance(module, nn.MultiheadAttention):
            module.forward = types.MethodType(_make_attention_forward(ctx, type(module).forward), module)
        elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            module.forward = types.MethodType(_make_layer_forward(ctx, type(module).forward), module)


def _make_layer_forward(ctx: FusionContext, plain):
    """A transformer layer tells the Dropouts inside it where its batch is (``batch_first``)."""
    def forward(self, *args, **kwargs):
        if ctx.groups == 0:
            return plain(self, *args, **kwargs)
        outer, ctx.batch_dim = ctx.batch_dim, 0 if self.self_attn.batch_first else 1
        try:
            return plain(self, *args, **kwargs)
        finally:
            ctx.batch_dim = outer

    return forward


def _make_bn_forward(ctx: FusionContext, plain):
    def forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if ctx.groups == 0 or not self.training:
            return plain(self, x)
        _refuse_recomputation(ctx, self)
        g, c, rest = ctx.groups, x.shape[1], x.shape[2:]
        _, inner = locate_rows(x, ctx, self, sequence_first=False)  # BatchNorm's batch is dimension 0
        # Rows are interleaved (sample i of segment k is row i*G + k), so the contiguous input, read
        # as a batch of b with G*C channels, has segment k's channel j at channel k*C + j: a *view*.
        # One native BatchNorm call on it computes every (segment, channel) statistic with no copy
        # in or out, far faster than hand-written reductions or one call per segment (README).
        # (An input whose dimension 0 folds several rows into each sample, e.g. (N*L, C), is moved
        # into that layout by one copy, and back.)
        parts = x.unflatten(0, (-1, g, inner)).transpose(1, 2)  # (b, inner, G, C, ...)
        wide = parts.reshape(-1, g * c, *rest)  # a view when inner == 1 and x is contiguous
        # momentum=1: the scratch rows receive exactly each segment's batch mean and unbiased variance,
        # in the dtype of the module's own statistics, as plain BatchNorm keeps them (under autocast x
        # is bf16/fp16 while the buffers and weights stay float32).
        stats = next((t.dtype for t in (self.running_mean, self.weight) if t is not None), x.dtype)
        batch_mean = torch.zeros(g, c, dtype=stats, device=x.device)
        batch_var = torch.ones(g, c, dtype=stats, device=x.device)
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        y = F.batch_norm(wide, batch_mean.view(-1), batch_var.view(-1), weight, bias, True, 1.0, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            if id(self) in ctx.stat_sums:
                raise RuntimeError(f"fused execution: {type(self).__name__} called twice in one forward pass "
                                   "(its running statistics would count twice); use execution='sequential'")
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                # sum_s w_s * ((1 - m) * running + m * batch_s) = (1 - m) * running * sum(w) + m * batch^T w:
                # two kernels per buffer (few launches matter when groups are small)
                w = ctx.weights.to(stats)
                w_sum = w.sum()
                ctx.stat_sums[id(self)] = [
                    torch.addmv(self.running_mean * w_sum, batch_mean.T, w, beta=1 - momentum, alpha=momentum),
                    torch.addmv(self.running_var * w_sum, batch_var.T, w, beta=1 - momentum, alpha=momentum)]
        y = y.reshape(parts.shape).transpose(1, 2).reshape(x.shape)
        layout = channels_last_format(x)
        if layout is not None:  # the layout plain BatchNorm gives such an input (a later Dropout's mask follows it)
            return torch.empty_like(x, memory_format=layout).copy_(y)
        return y

    return forward


def _make_dropout_forward(ctx: FusionContext, plain):
    def forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
        if ctx.groups == 0 or not self.training or self.p == 0:
            return plain(self, x)
        _refuse_recomputation(ctx, self)
        dim, inner = locate_rows(x, ctx, self)
        parts = segments_of(x, dim, inner, ctx.groups)
        # On a CPU, sequential execution's noise is empty_like(the node's tensor): dense, in the stride
        # order of its part here, which is what empty_like(part) gives. Its mask is filled in memory
        # order, so each node draws the values sequential execution draws, at the same places.
        noise_device = x.device.type in randomness.NOISE_DEVICES
        if noise_device and 0 < self.p < 1 and plain is nn.Dropout.forward:  # not a subclass's
            keep = 1 - self.p
            noise = interleave_like([torch.empty_like(part).bernoulli_(keep, generator=ctx.generators[k]).div_(keep)
                                     .flatten(dim, dim + 1) for k, part in enumerate(parts)], dim, inner)
            return x.mul_(noise) if self.inplace else x * noise
        if not noise_device and not alignment_known(x, ctx.groups):
            raise LayoutUnknown(f"{type(self).__name__} got a dense tensor that starts {x.storage_offset()} elements "
                                "into its storage: where a node's own tensor would start in sequential execution "
                                "(and so the mask a GPU's dropout kernel draws) is not certain; one node per group "
                                "is exact (fused_group_size=1 skips this redo)")
        outputs = []
        for k, part in enumerate(parts):
            segment = laid_out_alone(x, part, dim, inner)
            with default_generator_as(ctx.generators[k]):
                outputs.append(plain(self, segment))
        out = interleave_like(outputs, dim, inner)
        return x.copy_(out) if self.inplace else out

    return forward


def _make_attention_forward(ctx: FusionContext, plain):
    def forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        args = dict(key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                    average_attn_weights=average_attn_weights, is_causal=is_causal)
        if ctx.groups == 0 or not self.training or self.dropout == 0:
            return plain(self, query, key, value, **args)
        _refuse_recomputation(ctx, self)
        if ctx.groups == 1:  # the node's own call, whatever the shapes (e.g. unbatched, one sample at a time)
            with default_generator_as(ctx.generators[0]):
                return plain(self, query, key, value, **args)
        g, heads = ctx.groups, self.num_heads
        batch_dim = 0 if self.batch_first else 1
        for name, t, dim in (("query", query, batch_dim), ("key", key, batch_dim), ("value", value, batch_dim),
                             ("key_padding_mask", key_padding_mask, 0)):
            if t is not None and (t.dim() <= dim or t.shape[dim] != ctx.rows or (name != "key_padding_mask"
                                                                                  and t.dim() != 3)):
                raise LayoutUnknown(f"{type(self).__name__} (batch_first={self.batch_first}) got {name} of "
                                    f"shape {list(t.shape)} for a group of {ctx.rows} samples; one node per group "
                                    "is exact (fused_group_size=1 skips this redo)")
        if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] != ctx.rows * heads:
            raise LayoutUnknown(f"{type(self).__name__} got a 3-D attn_mask of shape {list(attn_mask.shape)} "
                                f"for a group of {ctx.rows} samples and {heads} heads; one node per group is exact "
                                "(fused_group_size=1 skips this redo)")

        noise_device = query.device.type in randomness.NOISE_DEVICES
        if noise_device and 0 < self.dropout < 1 and plain is nn.MultiheadAttention.forward:
            return attention_with_node_noise(self, plain, ctx, query, key, value, args)

        def segments(t, dim=batch_dim):  # each node's rows of an interleaved tensor (batch at ``dim``)
            # one unbind per tensor: its backward gathers the nodes' gradients in one pass
            return [None] * g if t is None else t.unflatten(dim, (-1, g)).unbind(dim + 1)

        queries = segments(query)
        keys = queries if key is query else segments(key)  # self-attention stays self-attention (packed projection)
        values = keys if value is key else segments(value)
        paddings = segments(key_padding_mask, 0)
        masks = [attn_mask] * g
        if attn_mask is not None and attn_mask.dim() == 3:  # (batch * heads, L, S): rows n * heads + h
            masks = [m.flatten(0, 1) for m in attn_mask.unflatten(0, (-1, g, heads)).unbind(1)]
        outputs, weights = [], []
        for k in range(g):
            with default_generator_as(ctx.generators[k]):
                out, w = plain(self, queries[k], keys[k], values[k],
                               **{**args, "key_padding_mask": paddings[k], "attn_mask": masks[k]})
            outputs.append(out)
            weights.append(w)
        return (interleave_like(outputs, batch_dim, 1),
                None if weights[0] is None else interleave_like(weights, 0, 1))

    return forward
