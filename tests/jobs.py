"""Small picklable jobs shared by the tests (module level, so spawned processes can import them)."""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vnodes.runtime import JobSpec


def synthetic_images(n: int = 200, seed: int = 1234, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float() * 0.5
    return TensorDataset(x, y)


class SmallCNN(nn.Module):
    """Conv + BatchNorm + Dropout: batch statistics, running statistics and a random stream."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 4 * 4, 16),
                                  nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


def small_cnn(dtype: torch.dtype = torch.float64) -> nn.Module:
    return SmallCNN().to(dtype)


def small_mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    """BatchNorm and Dropout in few layers: quick to compile."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 4)).to(dtype)


def per_sample_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def scalar_ce(outputs, targets):
    return F.cross_entropy(outputs, targets)


def cnn_spec(**overrides) -> JobSpec:
    kwargs = dict(
        model=small_cnn,
        dataset=synthetic_images,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4),
        loss=per_sample_ce,
        virtual_nodes=4,
        vnode_batch_size=8,
        seed=7,
        device="cpu",
    )
    kwargs.update(overrides)
    return JobSpec(**kwargs)


def det_f32_spec() -> JobSpec:
    """Deterministic, float32: the spec the multi-process tests compare bit for bit."""
    return cnn_spec(model=functools.partial(small_cnn, torch.float32), deterministic=True)


class SlowReads(torch.utils.data.Dataset):
    """``synthetic_images`` read with a delay per sample: stretches every step (so a test can act while
    a job runs) without changing anything it computes."""

    def __init__(self, delay_s: float, seed: int = 1234):
        self.data, self.delay_s = synthetic_images(seed=seed), delay_s

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        import time

        time.sleep(self.delay_s)
        return self.data[i]


def slow_det_spec() -> JobSpec:
    """``det_f32_spec`` whose reads take 2 ms a sample (about 64 ms a step on one worker)."""
    return dataclasses.replace(det_f32_spec(), dataset=functools.partial(SlowReads, 0.002))


# ---- a Hugging Face-style model from torch.nn: dict batches, an attention mask, outputs with .logits ----

@dataclasses.dataclass
class ClassifierOutput:
    logits: torch.Tensor


class TinyTextClassifier(nn.Module):
    """Embeddings, one self-attention block (masked), LayerNorm, Dropout, mean pooling over the
    unmasked tokens, a linear head: called as ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, vocab: int = 32, dim: int = 16, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        pad = attention_mask == 0
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        h = self.norm(h + self.drop(a))
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return ClassifierOutput(logits=self.head(pooled))


def token_dataset(n: int = 96, length: int = 8, vocab: int = 32, seed: int = 5) -> list:
    """Sequences whose class is the most frequent of three token ranges, padded to ``length``."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        size = int(torch.randint(3, length + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (size,), generator=g)
        label = int(torch.bucketize(ids, torch.tensor([11, 22])).bincount(minlength=3).argmax())
        input_ids = torch.zeros(length, dtype=torch.int64)
        input_ids[:size] = ids
        mask = torch.zeros(length, dtype=torch.int64)
        mask[:size] = 1
        items.append({"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(label)})
    return items


def text_step(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")


def text_step_with_metrics(model, batch):
    """``text_step`` with per-sample metrics beside the loss: accuracy and the true class's probability."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    loss = F.cross_entropy(logits, batch["labels"], reduction="none")
    return loss, {"accuracy": (logits.argmax(1) == batch["labels"]).float(),
                  "true_prob": logits.softmax(1).gather(1, batch["labels"][:, None])[:, 0].detach()}


def decay_groups(model, weight_decay: float = 0.1):
    """Weight decay on weights only: not on biases, norms or embeddings (by parameter name)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "norm" in name or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def text_spec(**overrides) -> JobSpec:
    kwargs = dict(model=TinyTextClassifier, dataset=token_dataset, step_fn=text_step,
                  optimizer=functools.partial(torch.optim.AdamW, lr=3e-3), param_groups=decay_groups,
                  virtual_nodes=4, vnode_batch_size=6, seed=11, device="cpu")
    kwargs.update(overrides)
    return JobSpec(**kwargs)
