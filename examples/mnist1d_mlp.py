"""A 1-D CNN with BatchNorm on MNIST-1D (4,000 training and 1,000 test sequences of length 40).

Run it:  vnodes run examples/mnist1d_mlp.py --steps 300
or:      python examples/mnist1d_mlp.py

MNIST-1D is generated here, from the ``mnist1d`` package's templates and its fixed seed (about two
seconds, no network); its download path is never used. The job is an 8-worker data-parallel job
(global batch 8 x 32, BatchNorm statistics per worker): its loss curve and final weights are the
same on one CPU as on 8 GPUs.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vnodes.runtime import JobSpec, train


@functools.lru_cache(maxsize=1)
def _mnist1d() -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds NumPy's and Python's global generators itself (args.seed = 42): the data
    # are the same every time, whatever ran before.
    return make_dataset(get_dataset_args())


def _tensors(x, y) -> TensorDataset:
    return TensorDataset(torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.long))


def build_dataset() -> TensorDataset:
    data = _mnist1d()
    return _tensors(data["x"], data["y"])


def build_test_dataset() -> TensorDataset:
    data = _mnist1d()
    return _tensors(data["x_test"], data["y_test"])


def build_model() -> nn.Module:
    # [b, 1, 40] -> [b, 32, 40] -> [b, 64, 20] -> [b, 64, 10] -> 10 logits
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(64 * 10, 10),
    )


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


spec = JobSpec(
    model=build_model,
    dataset=build_dataset,
    optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-2),
    loss=per_sample_loss,
    virtual_nodes=8,
    vnode_batch_size=32,
    seed=0,
)


def accuracy(state_dict: dict, dataset: TensorDataset) -> float:
    model = build_model()
    model.load_state_dict(state_dict)
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


if __name__ == "__main__":
    result = train(spec, steps=300)
    print(f"final loss {result.losses[-1]:.4f}, "
          f"test accuracy {accuracy(result.model_state_dict, build_test_dataset()):.3f} "
          f"({result.wall_time_s:.1f} s, {result.samples_per_s:,.0f} samples/s)")
