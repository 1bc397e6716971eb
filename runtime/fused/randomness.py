"""Per-node randomness: each virtual node of a group draws from its own generator, seeded from
``(seed, step, vnode_id)``, what sequential execution draws for that node.

Where fused execution knows the draw (Dropout, attention dropout) it draws each node's noise itself
(on ``NOISE_DEVICES``) or swaps the node's generator in as the device's default around the very call
sequential execution makes (``default_generator_as``). Random numbers drawn anywhere else in a
forward pass would be one stream for the group: the engine compares the default generators' states
before and after each group (``check_no_stray_draws``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .context import FusionContext
from .fallback import FusionUnsupported

# Devices on which F.dropout draws its noise as ATen's _dropout_impl does: bernoulli_(1 - p) into
# empty_like(input), divided by 1 - p. There fused Dropout draws each node's noise that way and applies
# all of it in one multiplication. Elsewhere (CUDA picks a fused kernel that draws differently, by
# layout) each node's rows go through the very F.dropout call that sequential execution makes.
# (Read as ``randomness.NOISE_DEVICES`` at each call, so that setting it here takes effect.)
NOISE_DEVICES = {"cpu"}


@contextlib.contextmanager
def default_generator_as(generator: torch.Generator):
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


def attention_with_node_noise(module: nn.MultiheadAttention, plain, ctx: FusionContext, query, key, value,
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
