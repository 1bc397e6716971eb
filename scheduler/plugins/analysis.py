"""``analyze(run_dir)``: what metadata archaeology found in a run, as numbers and as a report.

It reads the probe suites (``RUN_DIR/archaeology/probes.json``, written by ``MetadataArchaeology``)
and the recorded trajectories (``load_dynamics``), fits the kNN vote (``knn.py``) on every epoch
recorded, and returns an ``ArchaeologyReport``: p(suite) for every sample, the probes, and how
well the vote classifies the held-out probes (accuracy and confusion matrix). With ``write=True``
(the default, and ``vnodes analyze RUN_DIR``) it also writes ``RUN_DIR/analysis/``: ``report.html``
with PNG plots and ``samples.csv`` with every sample's probabilities (``report.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .archaeology import DIRECTORY, PROBES
from .knn import knn_proba
from .probes import ProbeSuites
from .recorder import load_dynamics

OUTPUT = "analysis"


@dataclasses.dataclass
class ArchaeologyReport:
    """What ``analyze`` found. Arrays are indexed by dataset index unless said otherwise."""

    run_dir: Path
    suites: tuple[str, ...]
    p: dict[str, np.ndarray]  # suite -> float32 [num_samples]: p(that suite)
    probes: dict[str, np.ndarray]  # suite -> int64: the dataset indices of its probes (reference, held-out)
    reference: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    epochs: int  # epochs of trajectory the vote used
    k: int
    metric: str
    heldout_accuracy: float  # fraction of held-out probes whose most likely suite is their own
    confusion: np.ndarray  # int64 [suites, suites]: row = a held-out probe's suite, column = its most likely
    loss: np.ndarray = dataclasses.field(repr=False)  # [num_samples, epochs] view of the recorded losses
    files: dict[str, Path] = dataclasses.field(default_factory=dict)  # what was written: name -> path

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.p.values())))

    def most_likely(self) -> np.ndarray:
        """int64 [num_samples]: each sample's most likely suite (an index into ``suites``)."""
        return np.stack([self.p[s] for s in self.suites], axis=1).argmax(axis=1)

    def flagged(self, suite: str, count: int = 16, include_probes: bool = False) -> np.ndarray:
        """The ``count`` samples with the highest p(``suite``), highest first (ties: lower index);
        probes left out unless ``include_probes``."""
        scores = self.p[suite].astype(np.float64).copy()
        if not include_probes:
            for idx in self.probes.values():
                scores[idx] = -np.inf
        order = np.lexsort((np.arange(len(scores)), -scores))
        order = order[np.isfinite(scores[order])]
        return order[:count]


def read_probes(run_dir: str | os.PathLike) -> tuple[ProbeSuites, dict[str, Any]]:
    path = Path(run_dir) / DIRECTORY / PROBES
    if not path.exists():
        raise FileNotFoundError(f"no probe suites in {run_dir} ({path} is missing): train with JobSpec(plugins="
                                "[DynamicsRecorder(), MetadataArchaeology()]) and this directory as checkpoint_dir")
    with open(path) as f:
        data = json.load(f)
    return ProbeSuites.from_json(data), dict(data.get("settings", {}))


def analyze(run_dir: str | os.PathLike, *, epochs: Optional[int] = None, k: Optional[int] = None,
            metric: Optional[str] = None, write: bool = True, dataset: Any = None,
            progress: Optional[Callable[[int, int], None]] = None) -> ArchaeologyReport:
    """Classify every sample of a run with ``MetadataArchaeology`` by its loss trajectory.

    Args:
        run_dir: the run's ``checkpoint_dir``.
        epochs: use the first ``epochs`` recorded epochs (default: all of them).
        k: override the job's number of neighbours in the vote.
        metric: override the job's distance, ``"euclidean"`` or ``"dtw"``.
        write: write ``RUN_DIR/analysis/`` (HTML report with PNG plots, CSV of probabilities).
        dataset: the job's dataset, to show the most-flagged samples' inputs in the report
            (images when inputs are 2-D or 3-D, curves when 1-D).
        progress: ``(done, total)`` samples classified, after each chunk.

    Raises:
        FileNotFoundError: ``run_dir`` has no probe suites or no recorded dynamics.
        ValueError: fewer epochs recorded than asked, or none.
    """
    run_dir = Path(run_dir)
    suites, settings = read_probes(run_dir)
    dynamics = load_dynamics(run_dir, "eval")
    recorded = dynamics.epochs
    use = recorded if epochs is None else epochs
    if recorded == 0:
        raise ValueError(f"{run_dir} holds no complete epoch of evaluation-pass losses yet; train at least one epoch")
    if isinstance(use, bool) or not isinstance(use, int) or not 1 <= use <= recorded:
        raise ValueError(f"epochs={epochs!r}: {run_dir} has {recorded} epoch(s) recorded; pass 1..{recorded} or None")
    k = int(k if k is not None else settings.get("k", 20))
    metric = metric or settings.get("metric", "euclidean")
    loss = dynamics.loss[:, :use]
    idx, labels = suites.reference_labels()
    p = knn_proba(np.ascontiguousarray(loss[idx]), labels, loss, num_classes=len(suites.suites), k=k, metric=metric,
                  progress=progress)
    by_suite = {s: np.ascontiguousarray(p[:, j]) for j, s in enumerate(suites.suites)}
    confusion = np.zeros((len(suites.suites), len(suites.suites)), np.int64)
    predicted = p.argmax(axis=1)
    for j, s in enumerate(suites.suites):
        rows = suites.heldout[s]
        rows = rows[np.isfinite(p[rows]).all(axis=1)]
        np.add.at(confusion[j], predicted[rows], 1)
    total = int(confusion.sum())
    accuracy = float(np.trace(confusion) / total) if total else float("nan")
    report = ArchaeologyReport(run_dir, suites.suites, by_suite, suites.probes(), suites.reference, suites.heldout,
                               use, k, metric, accuracy, confusion, loss)
    if write:
        from .report import write_report

        report.files = write_report(report, run_dir / OUTPUT, dataset=dataset)
    return report
