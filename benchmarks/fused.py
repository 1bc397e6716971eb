"""Fused against sequential execution, and both against one plain batch (CPU, or a GPU if asked).

    python benchmarks/fused.py [--device cpu|cuda] [--repeats 7] [--model resnet|transformer]

For each N x b: images/s of one plain batch of N*b (BatchNorm over all N*b samples: *not* virtual-node
semantics, the speed anchor), of N virtual nodes run one after another (sequential), of the same
N virtual nodes fused into one batch with per-node BatchNorm (fused), and of a plain batch whose
BatchNorms are per-node the obvious way, copying into the (node, channel) layout and back (the
"copies" anchor, ``models.SegmentMajorBatchNorm``: what fused mode saves by interleaving its rows).
Same model (the ResNet-style CNN of benchmarks/throughput.py), same data, interleaved repeats,
medians; fused/plain is the ratio the GPU targets of issue 5 are stated in. ``--model transformer``
runs a small batch-first transformer encoder with dropout 0.1 instead (no BatchNorm, so no copies
anchor), and as its anchor fused mode drawing dropout the way it must on a GPU: one Dropout and one
attention call per node, instead of one call per group with each node's noise (what a CPU allows).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import with_segment_major_batchnorm  # noqa: E402
from throughput import build_dataset, build_model, per_sample_loss  # noqa: E402

from vnodes.runtime import JobSpec  # noqa: E402
from vnodes.runtime.fused import randomness  # noqa: E402
from vnodes.runtime.engine import StepEngine  # noqa: E402


class Encoder(nn.Module):
    """Two batch-first transformer encoder layers with dropout 0.1, tokens of 32 positions -> 10 classes."""

    def __init__(self, width: int = 16, vocab: int = 256, length: int = 32):
        super().__init__()
        dim = 4 * width
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


def token_dataset(n: int, seed: int = 1234) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 256, (n, 32), generator=g), torch.randint(0, 10, (n,), generator=g))


MODEL = "resnet"  # set by --model


def model_fn(width: int):
    return functools.partial(Encoder if MODEL == "transformer" else build_model, width)


def dataset_fn(n: int):
    return functools.partial(token_dataset if MODEL == "transformer" else build_dataset, n)


def spec(n: int, b: int, execution: str, device: str, width: int, compile: bool = False) -> JobSpec:
    return JobSpec(model=model_fn(width), dataset=dataset_fn(n * b * 2),
                   optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), loss=per_sample_loss,
                   virtual_nodes=n, vnode_batch_size=b, seed=0, device=device, execution=execution, compile=compile)


class EngineSide:
    """vnodes' engine on one worker: every virtual node of a step, then the update."""

    def __init__(self, n, b, execution, device, width, compile=False):
        self.engine = StepEngine.build(spec(n, b, execution, device, width, compile))
        self.n, self.step = n, 0
        self.batches = [b for _, b in self.engine.loader.iterate((0, v) for v in range(n))]

    def run(self) -> None:
        e = self.engine
        partial = e.compute(self.step, (((self.step, v), b) for v, b in enumerate(self.batches)))
        e.apply(partial.payload, partial.used)
        self.step += 1


class PerNodeCalls(EngineSide):
    """Fused, but Dropout and attention dropout called once per node, as on devices whose dropout
    kernel draws differently from ATen's CPU code (CUDA)."""

    def run(self) -> None:
        saved, randomness.NOISE_DEVICES = randomness.NOISE_DEVICES, set()
        try:
            super().run()
        finally:
            randomness.NOISE_DEVICES = saved


class PlainBatch:
    """One batch of N*b, BatchNorm over all of it: the fastest thing the hardware does."""

    def __init__(self, n, b, device, width, segments=None):
        torch.manual_seed(0)
        self.model = model_fn(width)().to(device).train()
        if segments is not None:  # per-node BatchNorm by copies in and out (the "copies" anchor)
            self.model = with_segment_major_batchnorm(self.model, segments)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        data = dataset_fn(n * b * 2)()
        self.x = data.tensors[0][: n * b].to(device)
        self.y = data.tensors[1][: n * b].to(device)

    def run(self) -> None:
        loss = per_sample_loss(self.model(self.x), self.y).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()


def time_it(side, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    side.run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(n: int, b: int, device: str, width: int, repeats: int) -> dict:
    sides = {"plain": PlainBatch(n, b, device, width), "sequential": EngineSide(n, b, "sequential", device, width),
             "fused": EngineSide(n, b, "fused", device, width)}
    if MODEL != "transformer":
        sides["copies"] = PlainBatch(n, b, device, width, segments=n)
    else:
        sides["per-node"] = PerNodeCalls(n, b, "fused", device, width)
    for side in sides.values():  # warm-up
        side.run()
        side.run()
    times = {k: [] for k in sides}
    order = list(sides)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(time_it(sides[k], device))
    return {k: n * b / statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--configs", nargs="+", default=["16x8", "4x32"], help="NxB pairs")
    parser.add_argument("--model", choices=["resnet", "transformer"], default="resnet")
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    print(f"\nFused execution, {args.device}, {args.model} width {args.width}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    anchor = "fused, per-node dropout calls" if MODEL == "transformer" else "copies anchor"
    print(f"| N x b | plain batch (img/s) | sequential (img/s) | fused (img/s) | fused / plain | fused / sequential "
          f"| {anchor} (img/s) | fused / anchor |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in args.configs:
        n, b = map(int, cfg.split("x"))
        r = measure(n, b, args.device, args.width, args.repeats)
        side = "per-node" if MODEL == "transformer" else "copies"
        print(f"| {n} x {b} | {r['plain']:,.0f} | {r['sequential']:,.0f} | {r['fused']:,.0f} | "
              f"{r['fused'] / r['plain']:.2f}x | {r['fused'] / r['sequential']:.2f}x | "
              + f"{r[side]:,.0f} | {r['fused'] / r[side]:.2f}x |")


if __name__ == "__main__":
    main()
