"""What ``JobSpec(compile=True)`` gains, beside what ``torch.compile`` gains a plain training loop.

    python benchmarks/compile.py [--device cpu|cuda] [--repeats 9] [--configs 4x32 16x8]

For each model (the ResNet-style CNN of benchmarks/throughput.py; the transformer encoder of
benchmarks/fused.py) and N x b: samples/s of a plain loop (one batch of N*b, the anchor) eager and
compiled, and of vnodes' engine (sequential and fused) eager and compiled; the gains are compiled /
eager of the same side. "compile s" is the first compiled step's time (the compile itself, on the
cache this machine has; a fresh machine's first run takes longer). Interleaved repeats, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused  # noqa: E402
from machine import header  # noqa: E402


class Plain(fused.PlainBatch):
    """The anchor: one batch of N*b through the model, optionally compiled the same way."""

    def __init__(self, n: int, b: int, compile: bool, device: str, width: int):
        super().__init__(n, b, device, width)
        if compile:
            # torch.compile(module), not module.compile(): the latter leaves an nn.Sequential root
            # (this ResNet) uncaptured, a graph per block (runtime/engine.py, compile_in_place).
            self.model = torch.compile(self.model, dynamic=False)


def measure(n: int, b: int, device: str, width: int, repeats: int) -> tuple[dict, dict]:
    sides = {}
    for compile in (False, True):
        tag = "compiled" if compile else "eager"
        sides[f"plain {tag}"] = Plain(n, b, compile, device, width)
        for execution in ("sequential", "fused"):
            sides[f"{execution} {tag}"] = fused.EngineSide(n, b, execution, device, width, compile)
    first = {k: fused.time_it(side, device) for k, side in sides.items()}  # the compile, for compiled sides
    for side in sides.values():
        side.run()
    times = {k: [] for k in sides}
    order = list(sides)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(fused.time_it(sides[k], device))
    return {k: n * b / statistics.median(v) for k, v in times.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--configs", nargs="+", default=["4x32", "16x8"], help="NxB pairs")
    args = parser.parse_args()
    print(header("torch", extra=f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}"))
    print("| model | N x b | side | eager (samples/s) | compiled (samples/s) | compiled / eager | compile s |")
    print("|---|---|---|---|---|---|---|")
    for model in ("resnet", "transformer"):
        fused.MODEL = model
        for cfg in args.configs:
            n, b = map(int, cfg.split("x"))
            rate, first = measure(n, b, args.device, args.width, args.repeats)
            for side in ("plain", "sequential", "fused"):
                eager, compiled = rate[f"{side} eager"], rate[f"{side} compiled"]
                print(f"| {model} | {n} x {b} | {side} | {eager:,.0f} | {compiled:,.0f} | {compiled / eager:.2f}x | "
                      f"{first[f'{side} compiled']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
