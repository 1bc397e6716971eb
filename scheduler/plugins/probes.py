"""Probe suites: training samples with a known property, whose loss trajectories label the others.

Metadata archaeology (MAP-D, Siddiqui et al., ICLR 2023) plants samples of known kinds in the
training set and trains on them like on every other sample. A sample whose loss trajectory looks
like a suite's probes probably belongs to that suite (``knn.py``). The suites:

- ``mislabeled``: the label is replaced by a different class, ``(y + r) mod C`` with ``r`` drawn
  uniformly from ``1 .. C - 1``, so the class always changes;
- ``corrupted``: Gaussian noise is added to the inputs, of standard deviation ``noise`` times the
  inputs' standard deviation (measured on 256 samples drawn by the job's seed). MAP-D adds noise
  of standard deviation 0.1 to CIFAR images and 0.25 to ImageNet images in [0, 1], whose pixels have a
  standard deviation of about 0.25; ``noise=0.5`` (the default) sits between the two;
- ``typical`` and ``atypical``: unaltered samples with the highest and the lowest consistency
  scores, estimated before training by a cheap proxy (``consistency.py``) over a pool of at most
  ``POOL`` samples. Samples whose held-out models vote for another class than their label are
  left out of both: in a dataset with label noise they are the mislabeled ones, and as atypical
  probes they would teach the vote that mislabeled samples are atypical.

**Sizes.** MAP-D uses 250 reference and 250 held-out probes per suite. Here each suite has
``suite_size(N) = min(250, max(10, N // 40))`` reference probes and as many held-out ones, so four
suites hold at most 20% of a small dataset: 44 + 44 per suite for scikit-learn's digits (1,797
samples), 100 + 100 for MNIST-1D (4,000), 250 + 250 from 10,000 samples on.

**Seeds.** Which samples are altered, and how, follows from the job's seed, the dataset's size and
its class count alone, so every worker builds the same ``ProbedDataset`` and the master the same
suites. Each corrupted probe's noise is drawn from its own generator, seeded by (seed, index): the
same noise every epoch, on every worker. Reference and held-out probes are interleaved by score
(typical and atypical) or drawn at random (the altered suites).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from vnodes.runtime.errors import InvalidJobSpec

SUITES = ("typical", "atypical", "mislabeled", "corrupted")
ALTERED = ("mislabeled", "corrupted")
MAX_SUITE = 250  # MAP-D's reference (and held-out) probes per suite
POOL = 20_000  # samples the consistency proxy scores, at most
NOISE_SAMPLES = 256  # samples that measure the inputs' standard deviation
FORMAT = 1


def suite_size(num_samples: int) -> int:
    """Reference probes per suite (held-out probes: as many): ``min(250, max(10, N // 40))``."""
    return min(MAX_SUITE, max(10, num_samples // 40))


def _stream(seed: int, *words: Any) -> int:
    """A 63-bit seed for (the job's seed, what it is for): independent of every other stream."""
    digest = hashlib.blake2b(repr((seed, "archaeology") + words).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def target_of(item: Any) -> int:
    """The integer class of a dataset item ``(input, target)``."""
    y = item[1]
    if isinstance(y, torch.Tensor):
        if y.numel() != 1 or y.is_floating_point():
            raise InvalidJobSpec("plugins", f"metadata archaeology needs integer class targets; a target is a "
                                 f"{tuple(y.shape)} {y.dtype} tensor")
        return int(y)
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    raise InvalidJobSpec("plugins", f"metadata archaeology needs integer class targets; a target is {y!r}")


def all_targets(dataset: Any) -> np.ndarray:
    """Every sample's class: from a ``TensorDataset``'s target tensor or a ``targets`` attribute when
    there is one, else item by item."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2 and isinstance(tensors[1], torch.Tensor) \
            and not tensors[1].is_floating_point() and tensors[1].ndim == 1:
        return tensors[1].numpy().astype(np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return np.asarray([int(t) for t in targets], dtype=np.int64)
    return np.asarray([target_of(dataset[i]) for i in range(len(dataset))], dtype=np.int64)


@dataclasses.dataclass
class AlteredProbes:
    """The probes whose samples the job changes: same in every process (module docstring)."""

    mislabeled: np.ndarray  # int64 [2 * size]: reference first, then held-out
    offsets: np.ndarray  # int64, one per mislabeled probe, in 1 .. C - 1: new label = (y + offset) mod C
    corrupted: np.ndarray  # int64 [2 * size]
    num_classes: int

    @classmethod
    def draw(cls, num_samples: int, num_classes: int, seed: int, size: int, suites: Sequence[str]) -> "AlteredProbes":
        rng = np.random.Generator(np.random.PCG64(_stream(seed, "altered")))
        order = rng.permutation(num_samples)
        taken = 0
        chosen = {}
        for suite in ALTERED:
            if suite in suites:
                chosen[suite] = order[taken:taken + 2 * size]
                taken += 2 * size
            else:
                chosen[suite] = np.zeros(0, np.int64)
        offsets = rng.integers(1, num_classes, size=len(chosen["mislabeled"])) if num_classes > 1 else \
            np.zeros(len(chosen["mislabeled"]), np.int64)
        return cls(chosen["mislabeled"].astype(np.int64), offsets.astype(np.int64), chosen["corrupted"].astype(np.int64),
                   num_classes)


class ProbedDataset(torch.utils.data.Dataset):
    """The job's dataset with the altered probes altered (module docstring). ``base``: the dataset as
    the job built it."""

    def __init__(self, base: Any, altered: AlteredProbes, noise: float, seed: int):
        self.base = base
        self.altered = altered
        self.seed = seed
        self._relabel = dict(zip(altered.mislabeled.tolist(), altered.offsets.tolist()))
        self._corrupt = set(altered.corrupted.tolist())
        self.noise_std = 0.0
        if self._corrupt:
            self.noise_std = noise * input_std(base, seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        x, y = self.base[index]
        index = int(index)
        if index in self._corrupt:
            g = torch.Generator().manual_seed(_stream(self.seed, "noise", index))
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64) * self.noise_std
            x = (x.double() + noise).to(x.dtype)
        offset = self._relabel.get(index)
        if offset is not None:
            label = (target_of((x, y)) + offset) % self.altered.num_classes
            y = torch.full_like(y, label) if isinstance(y, torch.Tensor) else label
        return x, y


@contextlib.contextmanager
def seeded_reads(seed: int) -> Iterator[None]:
    """Read dataset items with every global random stream (torch's, Python's, NumPy's) seeded by
    ``seed``, and put back as they were afterwards: a dataset that augments in ``__getitem__`` then
    gives the same items in every process, whatever that process drew before."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def input_std(dataset: Any, seed: int) -> float:
    """Standard deviation of the inputs of ``NOISE_SAMPLES`` samples drawn by the seed."""
    n = len(dataset)
    rng = np.random.Generator(np.random.PCG64(_stream(seed, "input-std")))
    picks = rng.choice(n, size=min(n, NOISE_SAMPLES), replace=False)
    with seeded_reads(_stream(seed, "input-std-reads")):
        items = [dataset[i] for i in picks.tolist()]
    values = []
    for i, item in zip(picks.tolist(), items):
        x = item[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InvalidJobSpec("plugins", f"the corrupted probe suite adds Gaussian noise to inputs, but sample {i}'s "
                                 f"input is {type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' ' + str(x.dtype)}; "
                                 "leave the suite out: MetadataArchaeology(suites=('typical', 'atypical', 'mislabeled'))")
        values.append(x.double().reshape(-1))
    std = float(torch.cat(values).std())
    return std if std > 0 else 1.0


@dataclasses.dataclass
class ProbeSuites:
    """Every suite's reference and held-out probes (dataset indices)."""

    suites: tuple[str, ...]
    reference: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    num_classes: int
    noise_std: float

    def reference_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, suite ids) of every reference probe, suites in ``self.suites`` order."""
        idx = np.concatenate([self.reference[s] for s in self.suites])
        labels = np.concatenate([np.full(len(self.reference[s]), k) for k, s in enumerate(self.suites)])
        return idx.astype(np.int64), labels.astype(np.int64)

    def probes(self) -> dict[str, np.ndarray]:
        return {s: np.concatenate([self.reference[s], self.heldout[s]]) for s in self.suites}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "suites": list(self.suites), "num_classes": self.num_classes,
                "noise_std": self.noise_std, "reference": {s: self.reference[s].tolist() for s in self.suites},
                "heldout": {s: self.heldout[s].tolist() for s in self.suites}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ProbeSuites":
        if data.get("format") != FORMAT:
            raise ValueError(f"probe file format {data.get('format')!r}; this vnodes reads format {FORMAT}")
        suites = tuple(data["suites"])
        return cls(suites, {s: np.asarray(data["reference"][s], np.int64) for s in suites},
                   {s: np.asarray(data["heldout"][s], np.int64) for s in suites}, int(data["num_classes"]),
                   float(data["noise_std"]))

    def write(self, path: Path, settings: dict[str, Any]) -> None:
        """Atomically (a reader sees the old file or the new one), with the plugin's ``settings``."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({**self.to_json(), "settings": settings}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def pool_features(dataset: Any, pool: np.ndarray, seed: int, max_dim: int = 256,
                  chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Flattened inputs and classes of the ``pool`` samples. Inputs wider than ``max_dim`` are
    projected on the way in (a seeded Gaussian matrix, ``D x max_dim``), ``chunk`` samples at a
    time, so 20,000 ImageNet images never sit in memory at full width."""
    projection = None
    rows, labels = [], []
    for start in range(0, len(pool), chunk):
        with seeded_reads(seed + start):
            items = [dataset[i] for i in pool[start:start + chunk].tolist()]
        x = torch.stack([torch.as_tensor(item[0]).double().reshape(-1) for item in items])
        if x.shape[1] > max_dim:
            if projection is None:
                g = torch.Generator().manual_seed(seed)
                projection = torch.randn(x.shape[1], max_dim, generator=g, dtype=torch.float64) / max_dim ** 0.5
            x = x @ projection
        rows.append(x.numpy())
        labels.extend(target_of(item) for item in items)
    return np.concatenate(rows), np.asarray(labels, np.int64)


def likely_mislabeled(p_label: np.ndarray, p_other: np.ndarray, keep: int) -> np.ndarray:
    """The samples whose held-out models vote for another class than their label: mislabeled
    more likely than atypical, so neither typical nor atypical probes (at most as many as leave
    ``keep`` samples to choose from)."""
    voted_away = np.flatnonzero(p_other > p_label)
    room = len(p_label) - keep
    if len(voted_away) > room:  # keep the clearest cases out, and enough samples in
        voted_away = voted_away[np.argsort(p_label[voted_away] - p_other[voted_away], kind="stable")[:max(0, room)]]
    return np.sort(voted_away)


def build_suites(dataset: ProbedDataset, suites: Sequence[str], size: int, seed: int, rounds: int,
                 progress: Optional[Any] = None) -> ProbeSuites:
    """Every suite's probes: the altered ones as drawn, typical and atypical by the consistency proxy
    over a seeded pool of unaltered samples."""
    from .consistency import held_out_probabilities, typical_atypical

    altered = dataset.altered
    reference, heldout = {}, {}
    for suite, chosen in (("mislabeled", altered.mislabeled), ("corrupted", altered.corrupted)):
        if suite in suites:
            reference[suite], heldout[suite] = chosen[:size], chosen[size:2 * size]
    if "typical" in suites or "atypical" in suites:
        taken = np.concatenate([altered.mislabeled, altered.corrupted])
        free = np.setdiff1d(np.arange(len(dataset)), taken)
        rng = np.random.Generator(np.random.PCG64(_stream(seed, "pool")))
        pool = np.sort(rng.choice(free, size=min(len(free), POOL), replace=False))
        features, labels = pool_features(dataset.base, pool, _stream(seed, "projection"))
        scores, other = held_out_probabilities(features, labels, seed=_stream(seed, "proxy") % (2 ** 31),
                                               rounds=rounds, progress=progress)
        typical, atypical = typical_atypical(scores, 2 * size, exclude=likely_mislabeled(scores, other, 4 * size))
        for suite, rows in (("typical", typical), ("atypical", atypical)):
            if suite in suites:  # interleaved by score: reference and held-out probes alike
                chosen = pool[np.asarray(rows)]
                reference[suite], heldout[suite] = chosen[0::2], chosen[1::2]
    ordered = tuple(s for s in SUITES if s in suites)
    return ProbeSuites(ordered, {s: np.asarray(reference[s], np.int64) for s in ordered},
                       {s: np.asarray(heldout[s], np.int64) for s in ordered}, altered.num_classes,
                       dataset.noise_std)
