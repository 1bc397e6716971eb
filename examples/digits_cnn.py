"""A small CNN with BatchNorm on scikit-learn's bundled handwritten digits (8x8, 1,797 images).

Run it:  vnodes run examples/digits_cnn.py --steps 60 --run-dir runs/digits --log tensorboard
or:      python examples/digits_cnn.py          (TensorBoard: tensorboard --logdir runs/digits)

Every 20 steps (and after the last) the job evaluates the held-out 20% (loss and accuracy), sharded
over its virtual nodes: the same numbers on any number of workers.

What the 16 virtual nodes buy: this job *is* a 16-worker data-parallel job (global batch 16 x 32,
BatchNorm statistics per worker, DDP's data order). Run it on this laptop's one CPU today, on 4
GPUs tomorrow, or on whatever is left after a preemption: the loss curve and the final weights are
the same, because they depend on the job, not on the hardware.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vnodes.runtime import JobSpec, train


def _split(part: str) -> TensorDataset:
    """The training or held-out part of the digits: a fixed, stratified 80/20 split."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(range(len(digits.target)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    idx = train_idx if part == "train" else test_idx
    x = torch.tensor(digits.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[idx], dtype=torch.long)
    return TensorDataset(x, y)


def build_dataset() -> TensorDataset:
    return _split("train")


def build_test_set() -> TensorDataset:
    return _split("test")


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4 * 4, 10),
    )


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def eval_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-sample values, each averaged over the whole held-out set."""
    return {"loss": per_sample_loss(outputs, targets), "accuracy": (outputs.argmax(1) == targets).float()}


spec = JobSpec(
    model=build_model,
    dataset=build_dataset,
    optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    loss=per_sample_loss,
    virtual_nodes=16,
    vnode_batch_size=32,
    seed=0,
    eval_dataset=build_test_set,
    eval_every=20,
    eval_metrics=eval_metrics,
)


def test_accuracy(state_dict: dict) -> float:
    """Accuracy on the held-out 20% the job never trained on."""
    model = build_model()
    model.load_state_dict(state_dict)
    model.eval()
    data = build_test_set()
    with torch.no_grad():
        return (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()


if __name__ == "__main__":
    import dataclasses

    callbacks = []
    try:
        from vnodes.runtime.loggers import TensorBoardLogger

        callbacks.append(TensorBoardLogger("runs/digits"))
    except Exception as exc:  # noqa: BLE001 - tensorboard not installed: the example runs without it
        print(f"(no TensorBoard: {exc})")
    result = train(spec, steps=60, callbacks=callbacks)
    for evaluation in result.evaluations:
        print(f"evaluation at step {evaluation['step']}: loss {evaluation['loss']:.4f}, "
              f"accuracy {evaluation['accuracy']:.3f}")
    print(f"16 virtual nodes on 1 worker: final loss {result.losses[-1]:.4f}, held-out accuracy "
          f"{test_accuracy(result.model_state_dict):.3f} by hand ({len(build_test_set())} test images)"
          + (", TensorBoard in runs/digits" if callbacks else ""))

    # The same job on 1 worker and on 2 worker processes, deterministic mode: the same bits.
    exact = dataclasses.replace(spec, deterministic=True)
    one = train(exact, steps=20)
    two = train(exact, steps=20, workers=2)
    same = all(torch.equal(one.model_state_dict[k], two.model_state_dict[k]) for k in one.model_state_dict)
    print(f"deterministic, 20 steps: 1 worker loss {one.losses[-1]:.6f}, 2 workers loss {two.losses[-1]:.6f}, "
          f"bitwise identical weights: {same}")
