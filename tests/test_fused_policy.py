"""The fused fallback policy, as pure decisions: a failed group's snapshot -> what the engine does."""

import pytest
import torch

from vnodes.runtime import InvalidJobSpec
from vnodes.runtime.fused import (FailureKind, FusionUnsupported, GroupFailure, HalveGroup, LayoutUnknown,
                                  OneNodePerGroup, Raise, Reraise, RunSequentially, decide, group_size_for)

OOM, AMBIGUOUS, UNKNOWN, UNSUPPORTED, OTHER = (FailureKind.OUT_OF_MEMORY, FailureKind.LAYOUT_AMBIGUOUS,
                                              FailureKind.LAYOUT_UNKNOWN, FailureKind.UNSUPPORTED, FailureKind.OTHER)
STRAY = "the forward pass drew random numbers outside Dropout modules and attention"
RECOMPUTED = "BatchNorm1d ran again during backward (activation checkpointing recomputes it)"
SHAPE = "Dropout got an input of shape [32, 32, 16] for a group of 32 samples"


def refused(message):
    return Raise(InvalidJobSpec("cuda_graphs", f"replays fused groups, but fused execution cannot run this model: "
                                f"{message}; set cuda_graphs=False"))


def comparable(decision):
    """Exceptions compare by identity: a Raise compares by its error's type, field and text."""
    if isinstance(decision, Raise):
        return Raise, type(decision.error), decision.error.field, str(decision.error)
    return decision


@pytest.mark.parametrize("kind,message,size,graphs,expected", [
    # out of memory: halve, also under CUDA graphs (they are cleared); nothing smaller than one node
    (OOM, "CUDA out of memory", 8, False, HalveGroup(4, out_of_memory=True)),
    (OOM, "CUDA out of memory", 3, True, HalveGroup(1, out_of_memory=True)),
    (OOM, "CUDA out of memory", 1, False, Reraise()),
    (OOM, "CUDA out of memory", 1, True, Reraise()),
    # a shape with two readings: half the group tells them apart
    (AMBIGUOUS, SHAPE, 4, False, HalveGroup(2)),
    (AMBIGUOUS, SHAPE, 5, False, HalveGroup(2)),
    (AMBIGUOUS, SHAPE, 1, False, RunSequentially(SHAPE)),
    # no reading: one node per group has nothing to place
    (UNKNOWN, SHAPE, 4, False, OneNodePerGroup()),
    (UNKNOWN, SHAPE, 2, False, OneNodePerGroup()),
    (UNKNOWN, SHAPE, 1, False, RunSequentially(SHAPE)),
    # per-node semantics out of reach (stray random draws, activation checkpointing): sequential
    (UNSUPPORTED, STRAY, 4, False, RunSequentially(STRAY)),
    (UNSUPPORTED, RECOMPUTED, 4, False, RunSequentially(RECOMPUTED)),
    (UNSUPPORTED, STRAY, 1, False, RunSequentially(STRAY)),
    # CUDA graphs replay fused groups: no fallback, the setting is refused
    (AMBIGUOUS, SHAPE, 4, True, refused(SHAPE)),
    (UNKNOWN, SHAPE, 4, True, refused(SHAPE)),
    (UNKNOWN, SHAPE, 1, True, refused(SHAPE)),
    (UNSUPPORTED, STRAY, 2, True, refused(STRAY)),
    # not fused execution's to handle
    (OTHER, "shape mismatch", 4, False, Reraise()),
    (OTHER, "shape mismatch", 4, True, Reraise()),
    (OTHER, "shape mismatch", 1, False, Reraise()),
])
def test_decide(kind, message, size, graphs, expected):
    assert comparable(decide(GroupFailure(kind, message, size, graphs))) == comparable(expected)


@pytest.mark.parametrize("exc,kind", [
    (LayoutUnknown(SHAPE, ambiguous=True), AMBIGUOUS),
    (LayoutUnknown(SHAPE), UNKNOWN),
    (FusionUnsupported(STRAY), UNSUPPORTED),
    (FusionUnsupported("attention drew its noise twice: out of memory?"), UNSUPPORTED),  # fusion's own, not memory
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OOM),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), OOM),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"), OOM),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), OTHER),
    (ValueError("out of memory"), OTHER),  # only a RuntimeError is an allocator's
    (InvalidJobSpec("loss", "must return one loss per sample"), OTHER),
])
def test_a_failure_is_classified_by_its_error(exc, kind):
    assert GroupFailure.of(exc, 4, cuda_graphs=True) == GroupFailure(kind, str(exc), 4, True)
    assert GroupFailure.of(exc, 1, cuda_graphs=False) == GroupFailure(kind, str(exc), 1, False)


@pytest.mark.parametrize("remembered,nodes,expected", [(None, 4, 4), (2, 4, 2), (8, 4, 4), (4, 3, 3), (1, 6, 1)])
def test_group_size_for(remembered, nodes, expected):
    """None: all of the worker's nodes; a pinned or remembered size above them counts as all of them."""
    assert group_size_for(remembered, nodes) == expected


@pytest.mark.parametrize("kind,graphs", [(OOM, False), (OOM, True), (AMBIGUOUS, False), (UNKNOWN, False)])
def test_every_redo_runs_smaller_groups(kind, graphs):
    """The engine's redo loop ends: from two nodes up, each redo asks for fewer nodes per group, at least one."""
    sizes = {size: decide(GroupFailure(kind, "m", size, graphs)).size for size in range(2, 17)}
    assert all(1 <= new < old for old, new in sizes.items()), sizes
