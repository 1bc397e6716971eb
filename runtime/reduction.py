"""Summing per-virtual-node contributions: fast (accumulate in place) or canonical (bitwise).

Float addition is not associative, so a result independent of the VN->worker mapping needs a
summation order that ignores the mapping. The canonical order is a binary tree over ``vnode_id``:
leaves are single virtual nodes, a node sums its two aligned children (left + right), and the roots
of ``[0, N)``'s binary decomposition are folded left to right. Any worker holding a set of virtual
nodes pre-reduces the complete subtrees it owns (``Block``s); the blocks of all workers, merged in
``start`` order by the same rule, give bit for bit the sum one worker holding all N would compute.
Memory: at most ``log2(N) + 1`` partial sums are alive at once.
"""

from __future__ import annotations

import dataclasses

import torch

Payload = list[torch.Tensor]


@dataclasses.dataclass
class Block:
    """The sum over virtual nodes ``[start, start + size)``; ``size`` is a power of two dividing ``start``."""

    start: int
    size: int
    payload: Payload

    @property
    def stop(self) -> int:
        return self.start + self.size


def _add(left: Payload, right: Payload) -> Payload:
    torch._foreach_add_(left, right)  # left + right, elementwise; same bits as a loop of adds
    return left


class TreeReducer:
    """Pushes blocks in ascending ``start`` order and merges aligned siblings as they complete."""

    def __init__(self):
        self.stack: list[Block] = []

    def push(self, block: Block) -> None:
        if self.stack and block.start < self.stack[-1].stop:
            raise ValueError(f"blocks must arrive in ascending order: {block.start} after {self.stack[-1]}")
        while (
            self.stack
            and self.stack[-1].size == block.size
            and self.stack[-1].stop == block.start
            and self.stack[-1].start % (2 * block.size) == 0
        ):
            left = self.stack.pop()
            block = Block(left.start, 2 * left.size, _add(left.payload, block.payload))
        self.stack.append(block)

    def blocks(self) -> list[Block]:
        """The complete subtrees held so far, ascending (what a worker sends to its peers)."""
        return list(self.stack)

    def total(self) -> Payload:
        """Fold the remaining roots left to right. Valid once every virtual node has been pushed."""
        if not self.stack:
            raise ValueError("no virtual node was reduced")
        total = self.stack[0].payload
        for block in self.stack[1:]:
            total = _add(total, block.payload)
        return total


def canonical_sum(blocks: list[Block]) -> Payload:
    """The canonical sum of blocks gathered from every worker (any order in, one order out)."""
    reducer = TreeReducer()
    for block in sorted(blocks, key=lambda b: b.start):
        reducer.push(block)
    return reducer.total()
