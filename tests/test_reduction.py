"""The canonical reduction: any partition of the virtual nodes gives the same bits."""

import random

import pytest
import torch

from vnodes.runtime.engine import StepEngine
from vnodes.runtime.reduction import Block, TreeReducer, canonical_sum

from jobs import cnn_spec


def leaves(n, size=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # wide dynamic range so that the summation order changes the float32 result
    return [[torch.randn(size, generator=g) * 10.0 ** torch.randint(-4, 5, (1,), generator=g).item()]
            for _ in range(n)]


def reduce_partition(values, groups):
    blocks = []
    for group in groups:
        local = TreeReducer()
        for v in sorted(group):
            local.push(Block(v, 1, [t.clone() for t in values[v]]))
        blocks.extend(local.blocks())
    random.Random(len(groups)).shuffle(blocks)  # arrival order must not matter
    return canonical_sum(blocks)[0]


def random_partition(n, m, rng):
    owner = [rng.randrange(m) for _ in range(n)]
    return [[v for v in range(n) if owner[v] == w] for w in range(m) if w in owner]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64])
def test_every_partition_gives_identical_bits(n):
    values = leaves(n)
    reference = reduce_partition(values, [list(range(n))])
    rng = random.Random(n)
    for m in range(1, min(n, 6) + 1):
        for _ in range(5):
            got = reduce_partition(values, random_partition(n, m, rng))
            assert torch.equal(got, reference)
    assert torch.allclose(reference.double(), sum(v[0].double() for v in values), rtol=1e-4, atol=1e-3)


def test_the_order_matters_so_the_test_has_teeth():
    values = leaves(13)
    left_fold = values[0][0].clone()
    for v in values[1:]:
        left_fold += v[0]
    assert not torch.equal(left_fold, reduce_partition(values, [list(range(13))]))


def test_live_memory_is_logarithmic():
    reducer, peak = TreeReducer(), 0
    for v in range(64):
        reducer.push(Block(v, 1, [torch.zeros(1)]))
        peak = max(peak, len(reducer.stack))
    assert len(reducer.stack) == 1 and reducer.stack[0].size == 64
    assert peak <= 7


def test_blocks_out_of_order_are_refused():
    reducer = TreeReducer()
    reducer.push(Block(2, 1, [torch.zeros(1)]))
    with pytest.raises(ValueError):
        reducer.push(Block(1, 1, [torch.zeros(1)]))


def test_engine_partials_over_any_mapping_are_bitwise_equal():
    """One step computed by 1, 2 or 3 workers (same weights) reduces to the same bits."""
    spec = cnn_spec(virtual_nodes=6, deterministic=True, model=_float32_cnn)
    torch.set_num_threads(1)
    engine = StepEngine.build(spec)

    def run(groups):
        blocks = []
        for group in groups:
            partial = engine.compute(0, engine.loader.iterate((0, v) for v in group))
            blocks.extend(partial.blocks)
        return canonical_sum(blocks)

    one = run([range(6)])
    for groups in ([[0, 1, 2], [3, 4, 5]], [[0, 5], [1, 2, 3], [4]], [[v] for v in range(6)]):
        other = run(groups)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), groups


def _float32_cnn():
    from jobs import small_cnn

    return small_cnn(torch.float32)


def _reduce_in_group(index, address, groups, out):
    """One member of a real gloo group, formed through a real master: pre-reduce its own nodes (the
    master's rank decides which), then ``EpochGroup.reduce``."""
    from loopback import join
    from vnodes.runtime.collectives import EpochGroup
    from vnodes.runtime.engine import StepPartial

    client, plan = join(address)
    rank = plan.rank_of(client.worker_id)
    values = mixed_leaves(13)
    local = TreeReducer()
    for v in groups[rank]:
        local.push(Block(v, 1, [t.clone() for t in values[v]]))
    used = [rank == 1, False, rank == 2]
    group = EpochGroup(client, torch.device("cpu"), timeout_s=30)
    group.form(plan.membership_epoch, rank, len(plan.members))
    total, used = group.reduce(StepPartial(0, None, local.blocks(), {}, used), deterministic=True)
    torch.save((total, used), f"{out}/{rank}.pt")
    group.all_gather_objects(None)  # leave together


def mixed_leaves(n):
    """Three tensors per node, two dtypes, lengths that do not divide evenly among members."""
    return [[a, b.reshape(3, 5), c.double()] for (a,), (b,), (c,) in
            zip(leaves(n, 1001, seed=1), leaves(n, 15, seed=2), leaves(n, 1, seed=3))]


def test_reduce_over_a_real_gloo_group_gives_the_one_worker_bits(tmp_path):
    """Three processes, interleaved node sets: the reduce-scatter sum equals one worker's tree sum."""
    import torch.multiprocessing as mp
    from loopback import LoopbackMaster

    values = mixed_leaves(13)
    reference = TreeReducer()
    for v in range(13):
        reference.push(Block(v, 1, [t.clone() for t in values[v]]))
    expected = reference.total()
    groups = [[0, 1, 2, 3, 8, 9], [4, 5, 10], [6, 7, 11, 12]]
    master = LoopbackMaster(workers=3)
    try:
        mp.start_processes(_reduce_in_group, args=(master.address, groups, str(tmp_path)), nprocs=3, join=True,
                           start_method="spawn")
    finally:
        master.stop()
    for rank in range(3):
        total, used = torch.load(tmp_path / f"{rank}.pt")
        assert used == [True, False, True]
        assert [t.dtype for t in total] == [torch.float32, torch.float32, torch.float64]
        assert [t.shape for t in total] == [(1001,), (3, 5), (1,)]
        for got, want in zip(total, expected):
            assert torch.equal(got, want)
    # the comparison has teeth: another summation order differs in the float32 bits
    flat = [sum(values[v][0] for v in range(13))]
    assert not torch.equal(flat[0], expected[0])
