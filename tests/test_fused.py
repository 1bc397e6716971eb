"""Fused execution computes what sequential execution computes (float64, CPU)."""

import functools
import re
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

from vnodes.runtime import InvalidJobSpec, train
from vnodes.runtime import fused as fused_module
from vnodes.runtime.fused import layout, randomness, strides
from vnodes.runtime.engine import StepEngine

from jobs import cnn_spec, small_cnn


@pytest.fixture(params=["noise", "per-node-call"])
def dropout_path(request, monkeypatch):
    """Both ways fused Dropout draws: noise tensors applied at once (on a CPU), and one F.dropout call
    per node (on other devices, e.g. CUDA, whose dropout kernel draws differently)."""
    if request.param == "per-node-call":
        monkeypatch.setattr(randomness, "NOISE_DEVICES", set())
    return request.param


def rel_err(a, b):
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item()
               for k in b if b[k].is_floating_point())


@pytest.mark.parametrize("group_size", [None, 2, 3])
@pytest.mark.parametrize("running_stats", ["mean", "vnode0"])
def test_fused_cnn_with_batchnorm_and_dropout_equals_sequential(group_size, running_stats, dropout_path):
    seq = train(cnn_spec(virtual_nodes=6, running_stats=running_stats), steps=12)
    fused = train(cnn_spec(virtual_nodes=6, running_stats=running_stats, execution="fused",
                           fused_group_size=group_size), steps=12)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9
    assert fused.losses == pytest.approx(seq.losses, rel=1e-9)
    for k, v in seq.model_state_dict.items():
        if "num_batches" in k:
            assert int(fused.model_state_dict[k]) == int(v) == 12


class TinyTransformer(nn.Module):
    def __init__(self, vocab=32, dim=32, classes=4, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.1)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        # A ReLU before the BatchNorm: an affine map straight into BatchNorm would get (numerically)
        # zero gradients on its bias, which Adam turns into noise-driven steps.
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.BatchNorm1d(dim), nn.Linear(dim, classes))

    def forward(self, tokens):
        h = self.encoder(self.drop(self.embed(tokens)))
        return self.head(h.mean(dim=1))


def token_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 32, (160, 12), generator=g)
    return TensorDataset(x, x[:, 0] % 4)


def transformer_spec(model=lambda: TinyTransformer().double(), **kw):
    kw = {"virtual_nodes": 4, **kw}
    return cnn_spec(model=model, dataset=token_data, vnode_batch_size=8,
                    optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), **kw)


def test_fused_transformer_equals_sequential(dropout_path):
    seq = train(transformer_spec(), steps=8)
    fused = train(transformer_spec(execution="fused"), steps=8)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9
    # Not vacuous: the dropout streams matter (another seed moves the result).
    other = train(transformer_spec(seed=99), steps=8)
    assert rel_err(other.model_state_dict, seq.model_state_dict) > 1e-4


class MaskedAttention(nn.Module):
    """Sequence-first attention with dropout, a per-sample padding mask, a per-sample-and-head 3-D
    attention mask and its averaged weights used downstream: every input fused attention splits."""

    def __init__(self, vocab=32, dim=16, heads=2, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=0.2)  # batch_first=False
        self.head = nn.Linear(2 * dim, classes)
        self.heads = heads

    def forward(self, tokens):
        n, length = tokens.shape
        x = self.embed(tokens)  # (N, L, E)
        positions = torch.arange(length, device=tokens.device)
        ignored = positions >= (4 + tokens[:, :1] % 8)  # (N, L)
        padding = torch.zeros(ignored.shape, dtype=torch.float64).masked_fill(ignored, float("-inf"))
        distance = (positions[:, None] - positions[None, :]).abs().double()
        slope = (1 + tokens[:, 1] % 3).double()[:, None] * torch.arange(1, self.heads + 1).double()[None, :]
        bias = -(slope[:, :, None, None] * distance).flatten(0, 1)  # (N * heads, L, L)
        out, weights = self.attention(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1),
                                      key_padding_mask=padding, attn_mask=bias, need_weights=True)
        mixed = weights @ x  # (N, L, E)
        return self.head(torch.cat([out.transpose(0, 1), mixed], dim=-1).mean(dim=1))


@pytest.mark.parametrize("model", [lambda: TinyTransformer(dropout=0.1).double(), lambda: MaskedAttention().double()],
                         ids=["encoder-layers", "masked-sequence-first"])
def test_fused_attention_with_dropout_equals_sequential(model, dropout_path):
    """Attention dropout is fused (no fallback): each node's call draws its sequential masks."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to sequential would warn
        assert StepEngine.build(transformer_spec(model=model, execution="fused")).fusion is not None
        seq = train(transformer_spec(model=model), steps=6)
        fused = train(transformer_spec(model=model, execution="fused"), steps=6)
        fused_pairs = train(transformer_spec(model=model, execution="fused", fused_group_size=2), steps=6)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9
    assert rel_err(fused_pairs.model_state_dict, seq.model_state_dict) <= 1e-9
    assert fused.losses == pytest.approx(seq.losses, rel=1e-9)
    other = train(transformer_spec(model=model, seed=99), steps=6)
    assert rel_err(other.model_state_dict, seq.model_state_dict) > 1e-4


@pytest.mark.parametrize("features,known", [(12, False), (16, True)])
def test_a_gpu_dropout_input_whose_alignment_alone_is_uncertain_is_refused(features, known, monkeypatch):
    """(L, N, E)[1:] starts N * E elements into its storage; alone, a node's own starts b * E in.
    3 nodes of 1 float32 sample of 12 features: 144 against 48 bytes, 16 and 48 modulo 64, so a GPU's
    dropout kernel could vectorise differently: refused (the engine then runs one node per group).
    With 16 features: 192 and 64 bytes, both 0 modulo 64: run as usual."""
    monkeypatch.setattr(randomness, "NOISE_DEVICES", set())  # the per-node call path of non-CPU devices
    drop = nn.Dropout(0.5)
    ctx = fused_module.FusionContext()
    fused_module.patch_model(drop, ctx)
    ctx.groups, ctx.rows, ctx.generators = 3, 3, [torch.Generator().manual_seed(k) for k in range(3)]
    x = torch.randn(5, 3, features)[1:]
    assert strides.is_dense(x) and x.storage_offset() == 3 * features
    if known:  # each node's rows get what its own F.dropout call draws from its generator
        out = drop(x)
        for k in range(3):
            with randomness.default_generator_as(torch.Generator().manual_seed(k)):
                own = F.dropout(x[:, k:k + 1].contiguous(), 0.5)
            assert torch.equal(out[:, k:k + 1], own)
    else:
        with pytest.raises(fused_module.LayoutUnknown, match="starts 36 elements into its storage"):
            drop(x)


def test_fused_attention_noise_is_drawn_for_the_calling_thread_only():
    """The per-node draw replaces the group's draw in this thread; another thread's dropout meanwhile
    draws from its default generator as usual."""
    ctx = fused_module.FusionContext()
    ctx.groups, ctx.rows = 2, 4
    ctx.generators = [torch.Generator().manual_seed(k) for k in range(2)]
    torch.manual_seed(5)
    expected = F.dropout(torch.ones(8, 3, 3), 0.3)  # (rows * heads, L, S): the shape the mode replaces
    seen = {}

    def other_thread():
        torch.manual_seed(5)
        seen["out"] = F.dropout(torch.ones(8, 3, 3), 0.3)

    with randomness._NodeNoise(ctx, heads=2) as noise:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        mine = F.dropout(torch.ones(8, 3, 3), 0.3)
    assert torch.equal(seen["out"], expected) and noise.draws == 1
    assert not torch.equal(mine, expected)


def test_fused_attention_with_dropout_one_equals_sequential():
    attention = nn.MultiheadAttention(8, 2, dropout=1.0, batch_first=True).double()
    batches = [torch.randn(2, 3, 8, dtype=torch.float64) for _ in range(2)]
    sequential = [attention(x, x, x)[0] for x in batches]
    ctx = fused_module.FusionContext()
    fused_module.patch_model(attention, ctx)
    ctx.groups, ctx.rows, ctx.generators = 2, 4, [torch.Generator().manual_seed(k) for k in range(2)]
    group = fused_module.interleave_batches(batches)
    fused = attention(group, group, group)[0]
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused, fused_module.interleave_batches(sequential), rtol=1e-12, atol=1e-12)


class CausalAttention(nn.Module):
    """Causal self-attention through scaled_dot_product_attention's is_causal, then attention whose
    padding mask hides every key of some samples (rows of probabilities that are all zeros)."""

    def __init__(self, dim=16, heads=2, classes=4):
        super().__init__()
        self.embed = nn.Embedding(32, dim)
        self.causal = nn.MultiheadAttention(dim, heads, dropout=0.25, batch_first=True)
        self.padded = nn.MultiheadAttention(dim, heads, dropout=0.25, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens)
        length = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
        h, _ = self.causal(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        hidden = (tokens % 5 == 0) | (tokens[:, :1] % 7 == 0)  # some samples: every key hidden
        out, _ = self.padded(h, x, x, key_padding_mask=hidden, need_weights=False)
        return self.head(torch.nan_to_num(out).mean(dim=1) + h.mean(dim=1))


def test_fused_causal_and_fully_masked_attention_equals_sequential(dropout_path):
    def build():
        return CausalAttention().double()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to sequential would warn
        seq = train(transformer_spec(model=build), steps=5)
        fused = train(transformer_spec(model=build, execution="fused"), steps=5)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9
    assert fused.losses == pytest.approx(seq.losses, rel=1e-9)
    other = train(transformer_spec(model=build, seed=99), steps=5)  # the masks matter
    assert rel_err(other.model_state_dict, seq.model_state_dict) > 1e-4
    tokens = token_data().tensors[0]
    assert ((tokens % 5 == 0) | (tokens[:, :1] % 7 == 0)).all(dim=1).any()  # some sample hides every key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_weights", [False, True])
def test_fused_attention_draws_each_nodes_mask_in_low_precision(dtype, need_weights):
    """One attention call on a group of 3 nodes gives what the 3 nodes' own calls give, mask for mask
    (CPU attention computes float16/bfloat16 in float32 and draws its mask there)."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True).to(dtype)
    batches = [torch.randn(2, 5, 16, dtype=dtype) for _ in range(3)]
    sequential = []
    for k, x in enumerate(batches):
        torch.manual_seed(100 + k)
        sequential.append(attention(x, x, x, need_weights=need_weights)[0])
    ctx = fused_module.FusionContext()
    fused_module.patch_model(attention, ctx)
    ctx.groups, ctx.rows = 3, 6
    ctx.generators = [torch.Generator().manual_seed(100 + k) for k in range(3)]
    group = fused_module.interleave_batches(batches)
    fused = attention(group, group, group, need_weights=need_weights)[0]
    expected = fused_module.interleave_batches(sequential)
    scale = expected.abs().max().item()
    error = (fused - expected).abs().max().item() / scale
    assert error <= (1e-5 if dtype == torch.float32 else 2e-3)  # bfloat16: computed as CPU attention does
    ctx.generators = [torch.Generator().manual_seed(200 + k) for k in range(3)]  # other masks: far off
    assert (attention(group, group, group, need_weights=need_weights)[0] - expected).abs().max().item() / scale > 0.1


def _nodes_of(h, g):  # node k's samples of an interleaved group
    return [h.unflatten(0, (-1, g)).select(1, k) for k in range(g)]


@pytest.mark.parametrize("view,dim,inner", [
    (lambda h: h, 0, 1),
    (lambda h: h[:, 0], 0, 1),  # non-dense
    (lambda h: h.chunk(2, dim=-1)[1], 0, 1),  # non-dense, 3 floats past an aligned address
    (lambda h: h[:, 1:2, 3:].flatten(1), 0, 1),  # dense and misaligned when the node has one sample
    (lambda h: h.transpose(0, 1), 1, 1),  # sequence-first, dense, not contiguous
    (lambda h: h.transpose(0, 1).contiguous(), 1, 1),
    (lambda h: h.transpose(0, 1).contiguous()[..., 1:], 1, 1),  # sequence-first, non-dense
    (lambda h: h.unflatten(-1, (2, 3)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last), 0, 1),
    (lambda h: h.reshape(-1, h.shape[-1]), 0, 4),  # flattened: 4 rows per sample
    (lambda h: h[:, :1].expand(-1, 4, -1), 0, 1),  # overlapping
], ids=["contiguous", "slice", "chunk-half", "misaligned-dense", "sequence-first-view", "sequence-first",
        "sequence-first-slice", "channels-last", "flattened", "expanded"])
@pytest.mark.parametrize("b", [1, 3])
def test_a_nodes_dropout_input_is_laid_out_as_in_sequential_execution(view, dim, inner, b):
    """What CUDA's dropout kernel reads off its input (density, dimension order, address alignment)
    is the same for a node's per-node copy in fused mode as for its own tensor in sequential mode."""
    g = 4
    alone = [torch.randn(b, 4, 6) for _ in range(g)]  # each node's activation in sequential execution
    x = view(fused_module.interleave_batches(alone))
    parts = layout.segments_of(x, dim, inner, g)
    for k in range(g):
        node, own = strides.laid_out_alone(x, parts[k], dim, inner), view(alone[k])
        assert torch.equal(node, own)
        assert strides.is_dense(node) == strides.is_dense(own) == is_non_overlapping_and_dense(own)
        if strides.is_dense(own):  # same dimension order (the stride of a size-1 dimension is moot)
            assert [s for n, s in zip(node.shape, node.stride()) if n > 1] == \
                [s for n, s in zip(own.shape, own.stride()) if n > 1]
        assert node.data_ptr() % 64 == own.data_ptr() % 64


class SequenceFirstEncoder(nn.Module):
    """PyTorch's default transformer layout, (L, N, E): the Dropouts inside see the batch at dim 1."""

    def __init__(self, square=False):
        super().__init__()
        self.square = square  # L = 32 = N of a fused group: only the layer's batch_first tells where N is
        self.embed = nn.Embedding(32, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1)  # batch_first=False
        self.drop = nn.Dropout(0.2) if not square else nn.Identity()  # outside the layer: found by shape
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        if self.square:
            tokens = tokens.repeat(1, 3)[:, :32]
        return self.head(self.drop(self.layer(self.embed(tokens).transpose(0, 1))).mean(dim=0))


class FlattenedRows(nn.Module):
    """BatchNorm1d and Dropout on (N * L, E): each sample owns L consecutive rows."""

    def __init__(self, declared=True):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        if declared:  # (N * L, E) could as well be L whole batches of N
            self.norm.vnodes_layout = self.drop.vnodes_layout = "flattened"
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        n, length = tokens.shape
        h = self.drop(self.norm(self.embed(tokens).reshape(n * length, -1)))
        return self.head(h.reshape(n, length, -1).mean(dim=1))


class InplaceDropout(nn.Module):
    """Dropout(inplace=True) whose input is read afterwards: it must have changed, as in sequential mode."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.linear = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3, inplace=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        h = self.linear(self.embed(tokens))
        self.drop(h)
        return self.head(h.mean(dim=1))


class TwoViews(nn.Module):
    """Two views of each sample concatenated along the batch (contrastive learning): BatchNorm and
    Dropout see 2N rows, whole batches one after the other."""

    def __init__(self, declared=True):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.project = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        if declared:
            self.norm.vnodes_layout = self.drop.vnodes_layout = "batch-first"
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        views = torch.cat([self.embed(tokens).mean(dim=1), self.embed(tokens.flip(1)).amax(dim=1)])
        first, second = self.drop(torch.relu(self.norm(self.project(views)))).chunk(2)
        return self.head(torch.cat([first, second], dim=1))


class HalfDropout(nn.Dropout):
    """A Dropout subclass with a forward of its own: fused mode must call it, not plain dropout."""

    def forward(self, x):
        return 0.5 * F.dropout(x, self.p, self.training)


class SubclassedDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.drop = HalfDropout(0.3)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(self.drop(self.embed(tokens)).mean(dim=1))


class DropoutProbe(nn.Module):
    """Tokens -> embedding (``dim``) -> 4 classes from ``head_in`` features, with a Dropout that each
    subclass's forward applies to a tensor of some layout: the models below differ only in that."""

    def __init__(self, dim=16, head_in=None):
        super().__init__()
        self.embed = nn.Embedding(32, dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(head_in or dim, 4)


class SlicedDropout(DropoutProbe):
    """Dropout on non-dense inputs (a position's slice, the second half of a chunk)."""

    def __init__(self):
        super().__init__(dim=18, head_in=27)
        self.mix = nn.Linear(18, 18)

    def forward(self, tokens):
        h = self.mix(self.embed(tokens))
        first, half = self.drop(h[:, 0]), self.drop(h.chunk(2, dim=-1)[1])
        return self.head(torch.cat([first, half.mean(dim=1)], dim=-1))


class DrawsByHand(nn.Module):
    """Random numbers drawn in a forward, outside any Dropout module: one stream per group, if fused."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(F.dropout(self.embed(tokens), 0.3, self.training).mean(dim=1))


@pytest.mark.parametrize("model,nodes", [
    (SequenceFirstEncoder, 4), (SequenceFirstEncoder, 5), (functools.partial(SequenceFirstEncoder, square=True), 4),
    (FlattenedRows, 4), (TwoViews, 4), (InplaceDropout, 4), (SubclassedDropout, 4), (SlicedDropout, 4)],
    ids=["sequence-first", "sequence-first-5-nodes", "sequence-first-L-equals-N", "flattened-rows", "two-views",
         "inplace-dropout", "dropout-subclass", "sliced-dropout"])
def test_fused_finds_the_batch_in_other_layouts(model, nodes, dropout_path):
    def build():
        return model().double()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to sequential would warn
        seq = train(transformer_spec(model=build, virtual_nodes=nodes), steps=4)
        fused = train(transformer_spec(model=build, virtual_nodes=nodes, execution="fused"), steps=4)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9


class TransposedDropout(DropoutProbe):
    """Dropout on a feature-major (E, N) tensor with E = 16: half a group of 32 samples would match E."""

    def forward(self, tokens):
        return self.head(self.drop(self.embed(tokens).mean(dim=1).T).T)


class HeadsDropout(DropoutProbe):
    """Dropout on (N * L, 16, 2): 16 heads, each sample's rows together; undeclared."""

    def __init__(self):
        super().__init__(dim=32)

    def forward(self, tokens):
        n, length = tokens.shape
        return self.head(self.drop(self.embed(tokens).reshape(n * length, 16, 2)).reshape(n, length, 32).mean(dim=1))


class PerSampleDropout(DropoutProbe):
    """Dropout called on one sample's (16, E) tokens at a time."""

    def forward(self, tokens):
        h = self.embed(torch.cat([tokens, tokens[:, :4]], dim=1))
        return self.head(torch.stack([self.drop(s).mean(dim=0) for s in h]))


class AmbiguousDropout(DropoutProbe):
    """Dropout on (N, L, E) with L equal to the group's sample count: either dimension could be the batch."""

    def forward(self, tokens):
        h = self.embed(tokens.repeat(1, 3)[:, :32])  # L = 32 = N of a fused group of 4 x 8
        return self.head(self.drop(h).mean(dim=1))


class PerSampleAttention(nn.Module):
    """Unbatched attention calls, one per sample: no batch dimension to split."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.attention = nn.MultiheadAttention(16, 2, dropout=0.1)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(torch.stack([self.attention(s, s, s)[0].mean(dim=0) for s in self.embed(tokens)]))


class CheckpointedAttention(nn.Module):
    """Activation checkpointing: attention with dropout, and a BatchNorm, recomputed during backward."""

    def __init__(self, norm=False):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.attention = nn.MultiheadAttention(16, 2, dropout=0.3 * (not norm), batch_first=True)
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.head = nn.Linear(16, 4)

    def block(self, x):
        return self.norm(self.attention(x, x, x, need_weights=False)[0].mean(dim=1))

    def forward(self, tokens):
        return self.head(checkpoint(self.block, self.embed(tokens), use_reentrant=False))


@pytest.mark.parametrize("model,sizes,module", [
    (AmbiguousDropout, [2], "Dropout.*vnodes_layout"),  # L = 32 = N: gone with groups of 2 nodes (N = 16)
    (PerSampleAttention, [1], "MultiheadAttention"),  # unbatched calls: one node per group
    (functools.partial(TwoViews, declared=False), [1], "BatchNorm1d.*vnodes_layout"),  # 2 batches, or 2 rows each?
    (functools.partial(FlattenedRows, declared=False), [1], "BatchNorm1d.*vnodes_layout"),
    # No dimension of size N: a smaller group would match one by coincidence (16 features, heads, tokens).
    (TransposedDropout, [1], "Dropout.*no dimension"), (HeadsDropout, [1], "Dropout.*no dimension"),
    (PerSampleDropout, [1], "Dropout.*no dimension")])
def test_fused_runs_smaller_groups_where_it_cannot_place_the_samples(model, sizes, module):
    """Two readings of a shape: halve the group (the batch dimension halves, the other does not).
    No reading: one node per group, which has nothing to place."""
    def build():
        return model().double()

    seq = train(transformer_spec(model=build), steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = train(transformer_spec(model=build, execution="fused"), steps=3)
    messages = [str(w.message) for w in caught if str(w.message).startswith("fused execution")]
    assert len(messages) == len(sizes)
    for message, size in zip(messages, sizes):
        assert re.match(fr"fused execution runs groups of {size} virtual node\(s\) from step 0 on .*: {module}", message)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9
    assert fused.losses == pytest.approx(seq.losses, rel=1e-9)


def test_a_pinned_group_size_above_the_workers_nodes_counts_as_all_of_them():
    def build():
        return AmbiguousDropout().double()

    with pytest.warns(UserWarning, match=r"runs groups of 2 virtual node\(s\) from step 0 on \(were 4;") as caught:
        train(transformer_spec(model=build, execution="fused", fused_group_size=8), steps=2)
    assert len(caught) == 1


@pytest.mark.parametrize("model,module", [
    (CheckpointedAttention, "MultiheadAttention ran again during backward"),
    (functools.partial(CheckpointedAttention, norm=True), "BatchNorm1d ran again during backward"),
    (DrawsByHand, "the forward pass drew random numbers outside Dropout modules")])
def test_fused_falls_back_where_it_cannot_keep_sequential_semantics(model, module):
    def build():
        return model().double()

    seq = train(transformer_spec(model=build), steps=3)
    with pytest.warns(UserWarning, match=f"falls back to sequential from step 0 on: {module}"):
        fused = train(transformer_spec(model=build, execution="fused"), steps=3)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) == 0.0


def test_a_wrong_vnodes_layout_is_refused_before_training():
    def model():
        net = FlattenedRows().double()
        net.norm.vnodes_layout = "sequence-first"  # BatchNorm's batch is dimension 0
        return net

    with pytest.raises(InvalidJobSpec, match="'norm'.*vnodes_layout='sequence-first'.*'batch-first', 'flattened'"):
        StepEngine.build(transformer_spec(model=model, execution="fused"))


class ChannelsLastCNN(nn.Module):
    """Dropout after BatchNorm in channels_last: the mask follows the layout BatchNorm gives."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Dropout(0.3), nn.ReLU(),
                                  nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 64, 4))

    def forward(self, x):
        return self.head(self.body(x.contiguous(memory_format=torch.channels_last)))


def test_fused_channels_last_equals_sequential(dropout_path):
    def model():
        return ChannelsLastCNN().double().to(memory_format=torch.channels_last)

    seq = train(cnn_spec(model=model), steps=4)
    fused = train(cnn_spec(model=model, execution="fused"), steps=4)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9


class MixesSamples(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)  # statistics across the batch: not per virtual node


def test_unknown_modules_fall_back_to_sequential_with_a_warning():
    def model():
        return nn.Sequential(nn.Flatten(), MixesSamples(), nn.Linear(64, 4)).double()

    spec = cnn_spec(model=model, execution="fused")
    with pytest.warns(UserWarning, match="MixesSamples"):
        engine = StepEngine.build(spec)
    assert engine.fusion is None
    seq = train(cnn_spec(model=model), steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = train(spec, steps=3)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) == 0.0


def test_fused_refuses_deterministic_mode():
    with pytest.raises(InvalidJobSpec) as err:
        train(cnn_spec(execution="fused", deterministic=True), steps=1)
    assert err.value.field == "execution"


class OutOfMemoryAbove(nn.Module):
    """Acts like an allocator that fails beyond ``limit`` samples per batch."""

    vnodes_sample_wise = True
    limit = 16

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
        return x


def test_out_of_memory_halves_the_group_and_remembers(caplog):
    def model():
        return nn.Sequential(OutOfMemoryAbove(), nn.Flatten(), nn.Linear(64, 4)).double()

    spec = cnn_spec(model=model, execution="fused", virtual_nodes=8, vnode_batch_size=4)
    engine = StepEngine.build(spec)
    partial = engine.compute(0, engine.loader.iterate((0, v) for v in range(8)))
    assert engine.group_size == 4  # 32 -> 16 samples per group
    assert len(partial.vnode_losses) == 8
    seq = train(cnn_spec(model=model, virtual_nodes=8, vnode_batch_size=4), steps=3)
    fused = train(spec, steps=3)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9


class SpareNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.spare = nn.BatchNorm1d(4)  # registered, never called
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        return self.body(x)


def test_fused_with_an_unused_batchnorm_equals_sequential():
    def model():
        return SpareNorm().double()

    seq = train(cnn_spec(model=model), steps=4)
    fused = train(cnn_spec(model=model, execution="fused"), steps=4)
    assert rel_err(fused.model_state_dict, seq.model_state_dict) <= 1e-9


def test_cuda_graphs_are_refused_where_they_cannot_apply():
    """CUDA-graph replay is checked before any work: it needs fused execution and a CUDA device,
    and each refusal names the setting and the fix."""
    with pytest.raises(InvalidJobSpec, match="cuda_graphs.*execution='fused'"):
        cnn_spec(cuda_graphs=True).validate()
    with pytest.raises(InvalidJobSpec, match="cuda_graphs.*CUDA device.*cuda_graphs=False"):
        StepEngine.build(cnn_spec(execution="fused", cuda_graphs=True, device="cpu"))


def test_what_a_graph_cannot_capture_is_named():
    from vnodes.runtime.graphs import unsupported_reason

    cuda = torch.device("cuda")
    assert unsupported_reason(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), cuda) is None
    reason = unsupported_reason(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), cuda)
    assert "'1'" in reason and "Dropout with dropout 0.1" in reason
    reason = unsupported_reason(nn.Sequential(nn.MultiheadAttention(4, 2, dropout=0.2)), cuda)
    assert "'0'" in reason and "MultiheadAttention with dropout 0.2" in reason
    assert unsupported_reason(nn.Sequential(nn.MultiheadAttention(4, 2)), cuda) is None
    assert unsupported_reason(nn.Sequential(nn.Dropout(0.0)), cuda) is None
    reason = unsupported_reason(nn.Sequential(nn.BatchNorm2d(3, momentum=None)), cuda)
    assert "momentum=None" in reason


def _cnn_without_dropout():
    from jobs import small_cnn

    model = small_cnn()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # graphs refuse per-node random streams
    return model


class _ReplayOnCPU:
    """Stands in for a captured CUDA graph on the CPU, for the bookkeeping around it: like a real
    replay, it rewrites the captured output tensors in place and changes no Python state (``p.grad``
    stays None, the fusion context keeps the captured sums). The real thing runs in benchmarks/gpu.py."""

    def __init__(self, graphs, args, static_weights):
        self.graphs, self.args, self.static_weights = graphs, args, static_weights
        self.outputs = None

    def replay(self):
        g = self.graphs
        g._reset()
        saved = g.ctx.weights
        g.ctx.weights = self.static_weights  # a graph reads the tensors it captured, nothing newer
        means = g.forward_backward(*self.args)
        g.ctx.weights = saved
        fresh = [means] + [p.grad for p in g.params] + [t for v in g.ctx.stat_sums.values() for t in v]
        captured_means, captured_grads, captured_sums = self.outputs
        targets = [captured_means] + list(captured_grads) + [t for v in captured_sums.values() for t in v]
        for dst, src in zip(targets, fresh):
            if dst is not None:
                dst.copy_(src)
        g._reset()
        g.ctx.stat_sums = captured_sums


@pytest.mark.parametrize("running_stats", ["mean", "vnode0"])  # vnode0: groups' weights differ
def test_graph_replay_bookkeeping_equals_eager_fused(monkeypatch, running_stats):
    """Static inputs copied in, outputs copied (and gradients added) out of graph memory, buffers
    restored after the warm-up: with a replay stand-in on the CPU, fused + graphs equals fused."""
    from vnodes.runtime import graphs as graphs_module

    def capture_on_cpu(self, inputs, targets, weights, groups):
        static_in, static_t, static_w = inputs.clone(), targets.clone(), weights.clone()
        self.ctx.weights, self.ctx.groups = static_w, groups
        for _ in range(graphs_module.WARMUP_ITERATIONS):  # mutates the running buffers, like a real warm-up
            self._reset()
            self.forward_backward(static_in, static_t, groups)
        self._reset()
        graph = _ReplayOnCPU(self, (static_in, static_t, groups), static_w)
        means = self.forward_backward(static_in, static_t, groups)
        captured = self._captured(graph, static_in, static_t, static_w, means)
        graph.outputs = (captured.means, captured.grads, captured.stat_sums)
        return captured

    monkeypatch.setattr(graphs_module.GroupGraphs, "_capture", capture_on_cpu)
    monkeypatch.setattr(graphs_module, "unsupported_reason", lambda model, device: None)
    monkeypatch.setattr("vnodes.runtime.engine.unsupported_reason", lambda model, device: None)
    # 5 nodes in groups of 2: two graph shapes, the second captured in a step's last group.
    engines = [StepEngine.build(cnn_spec(model=_cnn_without_dropout, execution="fused", fused_group_size=2,
                                         virtual_nodes=5, cuda_graphs=graphs, running_stats=running_stats))
               for graphs in (False, True)]
    assert engines[1].graphs is not None and engines[0].graphs is None
    for step in range(3):
        partials = []
        for e in engines:
            batches = list(e.loader.iterate((step, v) for v in range(e.spec.virtual_nodes)))
            partials.append(e.compute(step, batches))
        eager, graphed = partials
        assert graphed.vnode_losses == pytest.approx(eager.vnode_losses, rel=1e-12)  # every group's, not the last
        for a, b in zip(graphed.payload, eager.payload):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
        for e, p in zip(engines, partials):
            e.apply(p.payload, p.used)
    states = [e.model.state_dict() for e in engines]
    for k, v in states[0].items():  # num_batches_tracked too: warm-ups must leave no trace
        assert torch.equal(states[1][k], v) if not v.is_floating_point() else torch.allclose(states[1][k], v, rtol=1e-12)


def test_fused_batchnorm_reads_the_interleaved_batch_without_copies(monkeypatch):
    """The group's rows are interleaved so that each BatchNorm normalises its own input, read as a
    (node, channel) batch, in place: no copy of the activations in or out."""
    spec = cnn_spec(execution="fused", virtual_nodes=4)
    engine = StepEngine.build(spec)
    module_inputs, norm_inputs = [], []
    for module in engine.model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(lambda m, args: module_inputs.append((args[0].data_ptr(), m)))
    plain = torch.nn.functional.batch_norm

    def recording(x, *args, **kwargs):
        norm_inputs.append((x.data_ptr(), x.shape))
        return plain(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", recording)
    engine.compute(0, engine.loader.iterate((0, v) for v in range(4)))
    assert len(norm_inputs) == len(module_inputs) > 0
    for (ptr, shape), (module_ptr, module) in zip(norm_inputs, module_inputs):
        assert ptr == module_ptr
        assert shape[1] == 4 * module.num_features  # every node's channels side by side


def test_interleave_batches_puts_sample_i_of_node_k_at_row_i_times_g_plus_k():
    from vnodes.runtime.fused import interleave_batches, segment_means

    a, b = torch.arange(6.).reshape(3, 2), 10 + torch.arange(6.).reshape(3, 2)
    x, y = interleave_batches([(a, torch.tensor([0, 1, 2])), (b, torch.tensor([3, 4, 5]))])
    assert x.tolist() == [[0, 1], [10, 11], [2, 3], [12, 13], [4, 5], [14, 15]]
    assert y.tolist() == [0, 3, 1, 4, 2, 5]
    assert segment_means(y.double(), 2).tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match=r"one shape, got \[\(2, 2\), \(3, 2\)\].*collate_fn"):
        interleave_batches([a, b[:2]])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_batchnorm_under_autocast_keeps_statistics_in_the_buffers_dtype(precision):
    """Under autocast the BatchNorm input is bf16/fp16 while weights and running statistics stay
    float32: fused mode's per-node statistics are taken (and mixed into the buffers) in float32, as
    plain BatchNorm takes them in each node's own call."""
    def model():
        return small_cnn(torch.float32)

    seq = train(cnn_spec(model=model, precision=precision), steps=1)
    fused = train(cnn_spec(model=model, precision=precision, execution="fused"), steps=1)
    stats = [k for k in seq.model_state_dict if k.endswith(("running_mean", "running_var"))]
    assert stats and all(fused.model_state_dict[k].dtype == torch.float32 for k in stats)
    # One step from the same weights: the same low-precision activations reach BatchNorm, so the
    # float32 statistics agree to float32 rounding (a bf16/fp16 round trip would be off by ~1e-3).
    assert max(((fused.model_state_dict[k] - seq.model_state_dict[k]).norm() / seq.model_state_dict[k].norm()).item()
               for k in stats) <= 1e-5
    assert fused.losses == pytest.approx(seq.losses, rel=1e-2)
