"""VNodeSampler reads exactly what DistributedSampler rank v reads, batch by batch, across epochs."""

import pytest
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from vnodes.runtime import InvalidJobSpec, VNodeSampler


def ddp_batches(n, world, rank, b, seed, epochs):
    data = list(range(n))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(data, batch_size=b, sampler=sampler, drop_last=True)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.extend(batch.tolist() for batch in loader)
    return out


@pytest.mark.parametrize("n,world,b,seed", [
    (100, 4, 8, 0), (101, 4, 8, 3), (97, 3, 5, 11), (64, 64, 1, 2), (1000, 7, 13, 5), (50, 1, 50, 9),
])
def test_matches_distributed_sampler_across_epochs(n, world, b, seed):
    sampler = VNodeSampler(n, world, b, seed)
    for rank in range(world):
        expected = ddp_batches(n, world, rank, b, seed, epochs=3)
        assert len(expected) == 3 * sampler.steps_per_epoch
        got = [sampler.indices(step, rank) for step in range(len(expected))]
        assert got == expected


def test_epochs_reshuffle_and_nodes_are_disjoint():
    sampler = VNodeSampler(120, 4, 10, 0)
    assert sampler.steps_per_epoch == 3
    step0 = [set(sampler.indices(0, v)) for v in range(4)]
    assert sum(len(s) for s in step0) == len(set().union(*step0)) == 40
    assert sampler.indices(0, 0) != sampler.indices(3, 0)  # epoch 1 is a new permutation
    assert sampler.epoch_of(2) == 0 and sampler.epoch_of(3) == 1


def test_dataset_smaller_than_a_global_batch_is_refused_with_the_numbers():
    with pytest.raises(InvalidJobSpec) as err:
        VNodeSampler(63, 8, 8, 0)
    assert err.value.field == "dataset"
    assert "63" in str(err.value) and "64" in str(err.value)
    with pytest.raises(ValueError):
        VNodeSampler(64, 8, 8, 0).indices(0, 8)
