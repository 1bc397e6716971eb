"""Placement policies: pure functions from the live workers to a VN -> worker mapping.

Each worker gets a contiguous, ascending range of ``vnode_id``s in rank order, so it can pre-reduce
whole subtrees of the canonical reduction tree. The per-VN batch never changes, so no placement
changes the math; placement only decides how long each worker takes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def even(n_vnodes: int, n_workers: int) -> list[int]:
    """Counts per worker that differ by at most one (the first ``n % m`` get one more)."""
    base, extra = divmod(n_vnodes, n_workers)
    return [base + (1 if r < extra else 0) for r in range(n_workers)]


def proportional(n_vnodes: int, throughputs: Sequence[float]) -> list[int]:
    """Counts proportional to measured throughput (largest remainder), at least one each.

    Unknown throughputs (<= 0) count as the mean of the known ones (or all equal if none is known).
    """
    m = len(throughputs)
    if m > n_vnodes:
        raise ValueError(f"{m} workers for {n_vnodes} virtual nodes")
    known = [t for t in throughputs if t > 0]
    fill = sum(known) / len(known) if known else 1.0
    speed = [t if t > 0 else fill for t in throughputs]
    total = sum(speed)
    spare = n_vnodes - m  # one each first, the rest by speed
    exact = [spare * s / total for s in speed]
    counts = [1 + math.floor(x) for x in exact]
    left = n_vnodes - sum(counts)
    by_remainder = sorted(range(m), key=lambda r: (-(exact[r] - math.floor(exact[r])), r))
    for r in by_remainder[:left]:
        counts[r] += 1
    return counts


def ranges(counts: Sequence[int]) -> list[list[int]]:
    """Contiguous ascending vnode ranges for the given per-rank counts."""
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def place(n_vnodes: int, throughputs: Sequence[float], policy: str = "throughput") -> list[list[int]]:
    """The VN ranges of each rank under ``policy`` (``"even"`` or ``"throughput"``)."""
    if policy == "even":
        return ranges(even(n_vnodes, len(throughputs)))
    if policy == "throughput":
        return ranges(proportional(n_vnodes, throughputs))
    raise ValueError(f"placement policy {policy!r}: use 'even' or 'throughput'")


def estimated_step_s(counts: Sequence[int], speeds: Sequence[float]) -> float:
    """The slowest worker's time for its share: ``max(count / speed)`` (speed in VNs per second)."""
    return max(c / s for c, s in zip(counts, speeds))


def rebalance(counts: Sequence[int], speeds: Sequence[float], min_gain: float = 0.10) -> Optional[list[int]]:
    """New counts if measured speeds promise a step at least ``min_gain`` faster; else ``None``.

    ``speeds`` are measured virtual nodes per second of compute (all known, > 0).
    """
    if len(counts) < 2 or any(s <= 0 for s in speeds):
        return None
    better = proportional(sum(counts), speeds)
    if better == list(counts):
        return None
    if estimated_step_s(better, speeds) < (1.0 - min_gain) * estimated_step_s(counts, speeds):
        return better
    return None
