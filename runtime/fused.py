"""Fused execution: several virtual nodes of a worker as one physical batch, same math.

A group of G virtual nodes runs as one batch of ``G * b`` samples, *interleaved*: sample ``i`` of node
``k`` of the group is row ``i * G + k`` (``interleave_batches``). Every sample-wise layer is blind to
the order; what would mix samples across virtual nodes is made per-segment, and the interleaving is
what makes that cheap (see the BatchNorm forward):

- BatchNorm1d/2d/3d compute batch statistics per segment of ``b`` samples, and each segment
  contributes its running-statistics update to the step's policy exactly as in sequential mode;
- Dropout draws each segment's mask from that virtual node's own generator, seeded from
  ``(seed, step, vnode_id)``, laid out as the node's tensor is in sequential execution: on a CPU as
  the noise ATen's CPU dropout draws, applied to the group in one multiplication; on other devices
  (CUDA's dropout kernel draws differently) by the very ``F.dropout`` call sequential execution
  makes, once per segment, with the node's generator swapped in as the device's default;
- MultiheadAttention with attention dropout: on a CPU, one call on the whole group whose dropout
  of the attention probabilities draws each segment's noise as ATen's CPU attention draws it
  (``_attention_with_node_noise``); on other devices once per segment, with the node's generator
  swapped in. Without dropout it is sample-wise and runs on the whole group.

Where the samples are in a tensor a patched module gets (``_locate_rows``): where the module's
``vnodes_layout`` says, or inside a transformer layer where its ``batch_first`` says, or else where
the shape allows exactly one reading (dimension 0 of size N, or dimension 1 of size N of a 3-D
tensor). Otherwise ``LayoutUnknown`` is raised, and the engine redoes the step with smaller groups,
and remembers it (with a warning naming the module and, for BatchNorm and Dropout, ``vnodes_layout``): half as many nodes where
two readings were possible (a coincidence such as a sequence length equal to N goes away), else one
node per group, which has nothing to place (its Dropout and attention run as in sequential
execution, on its own stream).

Random numbers drawn anywhere else in a forward pass would be one stream for the group: the engine
compares the default generators' states before and after each group (``check_no_stray_draws``) and,
if they moved, runs the job sequentially from that step on (with a warning). So it does when
activation checkpointing runs a patched module again during backward (``_refuse_recomputation``).

The modules are patched in place (their ``forward`` only), so parameter and buffer names, and so
checkpoints, stay those of the user's model. Leaf modules that are not known to be sample-wise make
``check_fusable`` report them; the engine then falls back to sequential execution with a warning.
Custom composite modules are assumed to compose their children sample by sample.
"""

from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InvalidJobSpec, VnodesError

# Leaf modules that treat each sample independently (no statistics across the batch, no randomness).
SAMPLE_WISE = (
    nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.Embedding, nn.EmbeddingBag,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Upsample,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.PixelShuffle,
)


class FusionUnsupported(VnodesError):
    """Fused execution cannot give this model's forward pass per-node semantics (randomness drawn by
    hand, activation checkpointing): the engine then runs the job sequentially, with a warning."""


class LayoutUnknown(FusionUnsupported):
    """A patched module cannot tell where the group's samples are in its input. ``ambiguous``: the
    shape allows two readings (dimensions 0 and 1 both of size N), and half the group tells them
    apart (the batch dimension halves, the other does not); the engine then halves its group size.
    Otherwise a smaller group could only match by coincidence: the engine runs one node per group,
    where there is nothing to place."""

    def __init__(self, message: str, ambiguous: bool = False):
        super().__init__(message)
        self.ambiguous = ambiguous


def check_fusable(model: nn.Module) -> list[str]:
    """Names of the modules that fused execution cannot treat per virtual node (empty: fusable)."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, (_BatchNorm, nn.Dropout)):
            continue
        if isinstance(module, nn.MultiheadAttention):
            continue  # sample-wise; its dropout is drawn per segment
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            if module.track_running_stats:
                bad.append(f"{name} ({type(module).__name__} tracking running stats)")
            continue
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or \
                next(module.children(), None) is not None:
            continue  # a container: its leaves decide
        if not isinstance(module, SAMPLE_WISE) and not getattr(module, "vnodes_sample_wise", False):
            bad.append(f"{name} ({type(module).__name__}: unknown; set `vnodes_sample_wise = True` on it "
                       "if it treats samples independently)")
    return bad


class FusionContext:
    """Per-group settings the patched modules read: segment count, weights, generators, sums."""

    def __init__(self):
        self.groups = 0  # 0: not fused (modules behave as usual)
        self.rows = 0  # samples in the group: groups * the nodes' batch size
        self.batch_dim: Optional[int] = None  # set while a transformer layer runs: where its batch is
        self.in_backward = False  # a patched module called now is being recomputed (activation checkpointing)
        self.weights: Optional[torch.Tensor] = None  # per segment: the running-stats policy weight
        self.generators: list[torch.Generator] = []  # per segment
        self.stat_sums: dict[int, list[torch.Tensor]] = {}  # id(bn) -> [sum of weighted mean, var]


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
        _, inner = _locate_rows(x, ctx, self, sequence_first=False)  # BatchNorm's batch is dimension 0
        # Rows are interleaved (sample i of segment k is row i*G + k), so the contiguous input, read
        # as a batch of b with G*C channels, has segment k's channel j at channel k*C + j: a *view*.
        # One native BatchNorm call on it computes every (segment, channel) statistic with no copy
        # in or out, far faster than hand-written reductions or one call per segment (README).
        # (An input whose dimension 0 folds several rows into each sample, e.g. (N*L, C), is moved
        # into that layout by one copy, and back.)
        parts = x.unflatten(0, (-1, g, inner)).transpose(1, 2)  # (b, inner, G, C, ...)
        wide = parts.reshape(-1, g * c, *rest)  # a view when inner == 1 and x is contiguous
        # momentum=1: the scratch rows receive exactly each segment's batch mean and unbiased variance.
        batch_mean = torch.zeros(g, c, dtype=x.dtype, device=x.device)
        batch_var = torch.ones(g, c, dtype=x.dtype, device=x.device)
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
                w = ctx.weights.to(x.dtype)
                w_sum = w.sum()
                ctx.stat_sums[id(self)] = [
                    torch.addmv(self.running_mean * w_sum, batch_mean.T, w, beta=1 - momentum, alpha=momentum),
                    torch.addmv(self.running_var * w_sum, batch_var.T, w, beta=1 - momentum, alpha=momentum)]
        y = y.reshape(parts.shape).transpose(1, 2).reshape(x.shape)
        layout = _channels_last_format(x)
        if layout is not None:  # the layout plain BatchNorm gives such an input (a later Dropout's mask follows it)
            return torch.empty_like(x, memory_format=layout).copy_(y)
        return y

    return forward


def _channels_last_format(x: torch.Tensor) -> Optional[torch.memory_format]:
    """``channels_last`` (or its 3-D form) if ``x`` is laid out so, else None."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


# Devices on which F.dropout draws its noise as ATen's _dropout_impl does: bernoulli_(1 - p) into
# empty_like(input), divided by 1 - p. There fused Dropout draws each node's noise that way and applies
# all of it in one multiplication. Elsewhere (CUDA picks a fused kernel that draws differently, by
# layout) each node's rows go through the very F.dropout call that sequential execution makes.
NOISE_DEVICES = {"cpu"}


def _make_dropout_forward(ctx: FusionContext, plain):
    def forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
        if ctx.groups == 0 or not self.training or self.p == 0:
            return plain(self, x)
        _refuse_recomputation(ctx, self)
        dim, inner = _locate_rows(x, ctx, self)
        parts = _segments(x, dim, inner, ctx.groups)
        # On a CPU, sequential execution's noise is empty_like(the node's tensor): dense, in the stride
        # order of its part here, which is what empty_like(part) gives. Its mask is filled in memory
        # order, so each node draws the values sequential execution draws, at the same places.
        if x.device.type in NOISE_DEVICES and 0 < self.p < 1 and plain is nn.Dropout.forward:  # not a subclass's
            keep = 1 - self.p
            noise = _interleave_like([torch.empty_like(part).bernoulli_(keep, generator=ctx.generators[k]).div_(keep)
                                      .flatten(dim, dim + 1) for k, part in enumerate(parts)], dim, inner)
            return x.mul_(noise) if self.inplace else x * noise
        if x.device.type not in NOISE_DEVICES and not _alignment_known(x, ctx.groups):
            raise LayoutUnknown(f"{type(self).__name__} got a dense tensor that starts {x.storage_offset()} elements "
                                "into its storage: where a node's own tensor would start in sequential execution "
                                "(and so the mask a GPU's dropout kernel draws) is not certain; one node per group "
                                "is exact (fused_group_size=1 skips this redo)")
        outputs = []
        for k, part in enumerate(parts):
            segment = _laid_out_alone(x, part, dim, inner)
            with _default_generator_as(ctx.generators[k]):
                outputs.append(plain(self, segment))
        out = _interleave_like(outputs, dim, inner)
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
            with _default_generator_as(ctx.generators[0]):
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

        if query.device.type in NOISE_DEVICES and 0 < self.dropout < 1 and plain is nn.MultiheadAttention.forward:
            return _attention_with_node_noise(self, plain, ctx, query, key, value, args)

        def segment(t, k, dim=batch_dim):  # node k's rows of an interleaved tensor (batch at ``dim``)
            return None if t is None else t.unflatten(dim, (-1, g)).select(dim + 1, k)

        outputs, weights = [], []
        for k in range(g):
            q = segment(query, k)
            kk = q if key is query else segment(key, k)  # self-attention stays self-attention (packed projection)
            v = kk if value is key else segment(value, k)
            mask = attn_mask
            if attn_mask is not None and attn_mask.dim() == 3:  # (batch * heads, L, S): rows n * heads + h
                mask = attn_mask.unflatten(0, (-1, g, heads)).select(1, k).flatten(0, 1)
            with _default_generator_as(ctx.generators[k]):
                out, w = plain(self, q, kk, v, **{**args, "key_padding_mask": segment(key_padding_mask, k, 0),
                                                  "attn_mask": mask})
            outputs.append(out)
            weights.append(w)
        return (_interleave_like(outputs, batch_dim, 1),
                None if weights[0] is None else _interleave_like(weights, 0, 1))

    return forward


class _NodeNoise(TorchDispatchMode):
    """While attention runs once on the whole group: its dropout's one draw, ``bernoulli_`` into a
    contiguous tensor shaped like the group's attention probabilities (``(N, heads, L, S)`` inside
    ``scaled_dot_product_attention``, ``(N * heads, L, S)`` on the weights with ``need_weights=True``),
    is replaced by each node's draw from its own generator into its own ``(b, heads, L, S)``, as
    sequential execution draws it, interleaved like the rows. Everything else runs as ATen runs it.
    A dispatch mode is per thread: other threads' draws are untouched."""

    def __init__(self, ctx: FusionContext, heads: int):
        super().__init__()
        self.ctx, self.heads, self.draws = ctx, heads, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.aten.bernoulli_.float or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        target, keep = args[0], args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        rows, g = self.ctx.rows, self.ctx.groups
        shapes = {rows: tuple(target.shape[1:]), rows * self.heads: (self.heads, *target.shape[1:])}
        if target.dim() == 0 or target.shape[0] not in shapes or not target.is_contiguous():
            return func(*args, **kwargs)  # not the probabilities: counted out by the caller's check
        self.draws += 1
        draws = [torch.empty((rows // g, *shapes[target.shape[0]]), dtype=target.dtype, device=target.device)
                 .bernoulli_(keep, generator=self.ctx.generators[k]) for k in range(g)]
        return target.copy_(torch.stack(draws, dim=1).reshape(target.shape))


def _attention_with_node_noise(module: nn.MultiheadAttention, plain, ctx: FusionContext, query, key, value,
                               args: dict):
    """One attention call on the whole group whose dropout draws each node's noise (``_NodeNoise``).
    On a CPU, ATen's attention drops probabilities as ``_dropout_impl`` does: ``bernoulli_(1 - p)``
    into ``empty_like`` of them, so node k's noise is what its own call would draw."""
    noise = _NodeNoise(ctx, module.num_heads)
    with noise:
        out = plain(module, query, key, value, **args)
    if noise.draws != 1:
        raise FusionUnsupported(f"{type(module).__name__}: attention on this torch version drew its dropout noise "
                                f"{noise.draws} times where fused execution expects once; use "
                                "execution='sequential' (and please report the torch version)")
    return out


ALIGNMENT = 64  # bytes: fresh allocations are aligned at least this much (CPU: 64, CUDA's caching allocator: 512)


def _laid_out_alone(x: torch.Tensor, part: torch.Tensor, dim: int, inner: int) -> torch.Tensor:
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


def _alignment_known(x: torch.Tensor, groups: int) -> bool:
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


def _dense_like(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """An empty dense tensor of ``shape`` whose dimensions lie in memory in the order of ``t``'s strides."""
    return t.new_empty_strided(shape, _dense_strides(t, shape))


LAYOUTS = ("batch-first", "flattened", "sequence-first")  # the values of a module's ``vnodes_layout``


def _locate_rows(x: torch.Tensor, ctx: FusionContext, module: nn.Module,
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


def _segments(x: torch.Tensor, dim: int, inner: int, g: int) -> list[torch.Tensor]:
    """Each node's part of ``x`` (views), dimension ``dim`` split into (its samples, ``inner``)."""
    rows = x.unflatten(dim, (-1, g, inner))
    return [rows.select(dim + 1, k) for k in range(g)]


def _interleave_like(segments: list[torch.Tensor], dim: int, inner: int) -> torch.Tensor:
    """Interleave per-segment results along ``dim`` (``inner`` entries per sample) into the memory
    layout the segments have (the layout one call on the whole group would give): later layers,
    Dropout among them, see each segment laid out as in sequential execution."""
    first, g = segments[0], len(segments)
    shape = list(first.shape)
    shape[dim] *= g
    out = _dense_like(first, shape)
    rows = out.unflatten(dim, (-1, g, inner))
    for k, segment in enumerate(segments):
        rows.select(dim + 1, k).copy_(segment.unflatten(dim, (-1, inner)))
    return out


@contextlib.contextmanager
def _default_generator_as(generator: torch.Generator):
    """Let code that draws from the default generator of ``generator``'s device draw from ``generator``.
    On CUDA that device is also made the current one: kernels draw from the current device's default."""
    device = generator.device
    current: contextlib.AbstractContextManager = contextlib.nullcontext()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        default, current = torch.cuda.default_generators[index], torch.cuda.device(index)
    else:
        default = torch.default_generator
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        with current:
            yield
    finally:
        generator.set_state(default.get_state())  # the node's stream goes on where the call left it
        default.set_state(saved)


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


def default_generator_states(device: torch.device) -> list[torch.Tensor]:
    """The states of the generators that code without a generator of its own draws from: the CPU's
    and ``device``'s. Fused execution gives each node its own stream only where it knows the draw
    (Dropout, attention dropout); ``check_no_stray_draws`` catches any other."""
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        states.append(torch.cuda.default_generators[index].get_state())
    return states


def check_no_stray_draws(before: list[torch.Tensor], device: torch.device) -> None:
    """Raise ``FusionUnsupported`` if a default generator moved since ``before`` (a group's forward
    drew random numbers that would be one stream for the group instead of one per node)."""
    if any(not torch.equal(a, b) for a, b in zip(before, default_generator_states(device))):
        raise FusionUnsupported("the forward pass drew random numbers outside Dropout modules and attention "
                                "(e.g. F.dropout or torch.rand called in a forward): fused, they would come "
                                "from one stream instead of each node's own")


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


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "DefaultCPUAllocator" in text)

