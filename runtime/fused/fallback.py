"""When a fused group cannot run as asked: the errors that say so, and what the engine does instead.

``decide`` is pure: from a snapshot of one failed attempt at a step (``GroupFailure``) to one decision
value. ``StepEngine._compute_fused`` discards the attempt and applies the decision, the one place that
changes the group size or leaves fused execution. The policy, row by row:

    failure                                   nodes per group  CUDA graphs  decision
    out of memory                             > 1              either       HalveGroup(size // 2, out_of_memory=True)
    out of memory                             1                either       Reraise()
    LayoutUnknown, two readings (ambiguous)   > 1              off          HalveGroup(size // 2)
    LayoutUnknown, no reading                 > 1              off          OneNodePerGroup()
    FusionUnsupported (stray random draws,    any (LayoutUnknown: 1)  off   RunSequentially(reason)
      activation checkpointing, ...)
    FusionUnsupported, LayoutUnknown          any              on           Raise(InvalidJobSpec("cuda_graphs"))
    anything else                             any              either       Reraise()

Two readings of a shape (dimensions 0 and 1 both of size N): half the group tells them apart (the
batch dimension halves, the other does not). No reading: a smaller group could only match by
coincidence, and one node per group has nothing to place (its Dropout and attention run as in
sequential execution, on its own stream). Replayed CUDA graphs have no fallback: the setting is
refused.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar, Optional, Union

import torch

from ..errors import InvalidJobSpec, VnodesError


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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's failure: CUDA's, or a RuntimeError of the CPU's."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "DefaultCPUAllocator" in text)


class FailureKind(str, enum.Enum):
    """What stopped a fused group."""

    OUT_OF_MEMORY = "out-of-memory"  # the allocator failed (CUDA's, or the CPU's)
    LAYOUT_AMBIGUOUS = "layout-ambiguous"  # LayoutUnknown(ambiguous=True): two dimensions of size N
    LAYOUT_UNKNOWN = "layout-unknown"  # LayoutUnknown: no dimension a smaller group could tell apart
    UNSUPPORTED = "unsupported"  # any other FusionUnsupported: stray draws, recomputation in backward, ...
    OTHER = "other"  # not fused execution's to handle


@dataclasses.dataclass(frozen=True)
class GroupFailure:
    """One failed attempt at a step: what failed, with how many nodes per group, and whether groups
    are replayed as CUDA graphs."""

    kind: FailureKind
    message: str  # the error's text, for the user
    group_size: int  # virtual nodes per group in the failed attempt
    cuda_graphs: bool

    @classmethod
    def of(cls, exc: BaseException, group_size: int, cuda_graphs: bool) -> "GroupFailure":
        if isinstance(exc, LayoutUnknown):
            kind = FailureKind.LAYOUT_AMBIGUOUS if exc.ambiguous else FailureKind.LAYOUT_UNKNOWN
        elif isinstance(exc, FusionUnsupported):  # before the memory test: fusion's own errors are never memory
            kind = FailureKind.UNSUPPORTED
        elif is_out_of_memory(exc):
            kind = FailureKind.OUT_OF_MEMORY
        else:
            kind = FailureKind.OTHER
        return cls(kind, str(exc), group_size, cuda_graphs)


@dataclasses.dataclass(frozen=True)
class HalveGroup:
    """Redo the step with groups of ``size`` nodes, and keep that size. ``out_of_memory``: the engine
    first frees cached memory (and captured graphs), and logs instead of warning (nothing to fix)."""

    size: int
    out_of_memory: bool = False


@dataclasses.dataclass(frozen=True)
class OneNodePerGroup:
    """Redo the step with one node per group, and keep that size: a group of one has nothing to place."""

    size: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class RunSequentially:
    """Redo the step, and run every later one, sequentially (with a warning that gives ``reason``)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Raise:
    """Stop with ``error`` in place of the failure (the engine raises it ``from None``)."""

    error: Exception


@dataclasses.dataclass(frozen=True)
class Reraise:
    """Not fused execution's to handle: the failure propagates unchanged."""


Decision = Union[HalveGroup, OneNodePerGroup, RunSequentially, Raise, Reraise]


def decide(failure: GroupFailure) -> Decision:
    """What the engine does after ``failure`` (the table in this module's docstring)."""
    kind, size = failure.kind, failure.group_size
    if kind is FailureKind.OUT_OF_MEMORY:
        return HalveGroup(size // 2, out_of_memory=True) if size > 1 else Reraise()
    if kind is FailureKind.OTHER:
        return Reraise()
    if failure.cuda_graphs:
        return Raise(InvalidJobSpec("cuda_graphs", f"replays fused groups, but fused execution cannot run "
                                    f"this model: {failure.message}; set cuda_graphs=False"))
    if kind is FailureKind.LAYOUT_AMBIGUOUS and size > 1:
        return HalveGroup(size // 2)  # the batch dimension halves, the other does not
    if kind is FailureKind.LAYOUT_UNKNOWN and size > 1:
        return OneNodePerGroup()  # a smaller group could only match by coincidence
    return RunSequentially(failure.message)


def group_size_for(remembered: Optional[int], nodes: int) -> int:
    """Nodes per group in a worker's next attempt at a step: ``remembered`` (``fused_group_size``,
    or the size a fallback left), at most the worker's ``nodes``; None: all of them."""
    return min(remembered or nodes, nodes)
