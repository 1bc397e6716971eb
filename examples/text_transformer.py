"""A small transformer classifier on a text task generated here: dict batches, bf16, clipping.

Run it:  python examples/text_transformer.py
or:      vnodes run examples/text_transformer.py --steps 150 --run-dir runs/text --log tensorboard

The task: sequences of token ids (with padding and an attention mask) whose label says which of
two marker tokens comes first. The model is written the way Hugging Face models are called
(``model(input_ids=..., attention_mask=...)``, an output with ``.logits``), so the job gives vnodes
a ``step_fn`` instead of a ``loss``. It trains under bf16 autocast, clips the reduced gradient to
norm 1, leaves biases, norms and embeddings out of weight decay (by parameter name), and evaluates
a held-out set every 50 steps. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from vnodes.runtime import JobSpec, train

VOCAB, LENGTH, MARK_A, MARK_B = 64, 24, 1, 2


def make_examples(n: int, seed: int) -> list[dict]:
    """Random tokens (3..63) of random length, with one MARK_A and one MARK_B somewhere; the label is
    1 if MARK_A comes first. Padded with 0 to LENGTH."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        size = int(torch.randint(6, LENGTH + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (size,), generator=g)
        a, b = torch.randperm(size, generator=g)[:2].tolist()
        ids[a], ids[b] = MARK_A, MARK_B
        input_ids = torch.zeros(LENGTH, dtype=torch.long)
        input_ids[:size] = ids
        mask = torch.zeros(LENGTH, dtype=torch.long)
        mask[:size] = 1
        examples.append({"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(int(a < b))})
    return examples


def build_dataset() -> list[dict]:
    return make_examples(4096, seed=0)


def build_eval_dataset() -> list[dict]:
    return make_examples(512, seed=1)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class Classifier(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(LENGTH, dim)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = self.norm((h * keep).sum(1) / keep.sum(1))
        return Output(logits=self.head(pooled))


def step(model: nn.Module, batch: dict) -> torch.Tensor:
    """One loss per sample, from a dict batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")


def eval_metrics(model: nn.Module, batch: dict) -> dict:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {"loss": F.cross_entropy(out.logits.float(), batch["labels"], reduction="none"),
            "accuracy": (out.logits.argmax(1) == batch["labels"]).float()}


def decay_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms or embeddings."""
    def exempt(name: str) -> bool:
        return name.endswith("bias") or "norm" in name or "embed" in name or "position" in name

    params = list(model.named_parameters())
    return [{"params": [p for n, p in params if not exempt(n)], "weight_decay": 0.05},
            {"params": [p for n, p in params if exempt(n)], "weight_decay": 0.0}]


spec = JobSpec(
    model=Classifier,
    dataset=build_dataset,
    step_fn=step,
    optimizer=functools.partial(torch.optim.AdamW, lr=2e-3),
    param_groups=decay_groups,
    precision="bf16",
    clip_grad_norm=1.0,
    virtual_nodes=8,
    vnode_batch_size=16,
    seed=0,
    eval_dataset=build_eval_dataset,
    eval_every=50,
    eval_metrics=eval_metrics,
)


if __name__ == "__main__":
    result = train(spec, steps=150)
    for evaluation in result.evaluations:
        print(f"evaluation at step {evaluation['step']}: loss {evaluation['loss']:.4f}, "
              f"accuracy {evaluation['accuracy']:.3f}")
    print(f"8 virtual nodes, bf16, clipped at norm 1: final training loss {result.losses[-1]:.4f}, "
          f"{result.samples_per_s:,.0f} samples/s")
