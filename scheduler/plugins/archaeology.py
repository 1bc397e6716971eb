"""``MetadataArchaeology``: which samples are mislabeled, corrupted, atypical or typical, from their
loss trajectories (MAP-D, Siddiqui et al., ICLR 2023).

The plugin plants probe suites in the training set (``probes.py``: it changes the job's dataset, so
it is a mutator of ``"dataset"``), and the ``DynamicsRecorder`` before it records every sample's loss
in an evaluation pass after each epoch. A k-nearest-neighbour vote of each sample's trajectory
among the reference probes' trajectories (``knn.py``: k = 20, Euclidean on the raw per-epoch losses,
as MAP-D does) gives every sample p(suite).

The probes are written to ``RUN_DIR/archaeology/probes.json`` when the master starts;
``analyze(run_dir)`` (``analysis.py``) fits the vote on the whole recording at the end. During
training the vote is fitted, once per epoch, only when a plugin after this one reads it
(``LabelCorrection``, ``PrioritizedSampling``, through ``p_for_step``): for step ``s`` on the epochs
``usable_epochs(s)``, a function of the step alone. The fit is a function of the recorded
trajectories, which are a function of the job, so nothing of it is checkpointed: a resumed master
fits again on the same rows, and a run stopped and resumed at any step decides what a run that
never stopped decides.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from vnodes.runtime.errors import InvalidJobSpec, StorageError
from vnodes.runtime.plugins import Plugin, PluginJob, SampleColumns

from .knn import knn_proba
from .probes import ALTERED, SUITES, AlteredProbes, ProbedDataset, ProbeSuites, all_targets, build_suites, suite_size

log = logging.getLogger(__name__)

DIRECTORY = "archaeology"
PROBES = "probes.json"
METRICS = ("euclidean", "dtw")


@dataclasses.dataclass
class MetadataArchaeology(Plugin):
    """Plant probe suites, and classify every sample's loss trajectory among them.

    Args:
        k: neighbours in the vote (MAP-D: 20).
        metric: ``"euclidean"`` (MAP-D's) or ``"dtw"`` (dynamic time warping, through ``dtaidistance``).
        suites: which probe suites to plant, from ``("typical", "atypical", "mislabeled", "corrupted")``.
        probes_per_suite: reference probes per suite (held-out: as many); default
            ``min(250, max(10, N // 40))`` for a dataset of N samples.
        noise: the corrupted probes' Gaussian noise, in units of the inputs' standard deviation.
        num_classes: the class count (default: from the dataset's targets).
        proxy_rounds: rounds of the consistency proxy that picks typical and atypical probes
            (``consistency.py``: two linear models per round).
    """

    k: int = 20
    metric: str = "euclidean"
    suites: tuple = SUITES
    probes_per_suite: Optional[int] = None
    noise: float = 0.5
    num_classes: Optional[int] = None
    proxy_rounds: int = 4

    name: ClassVar[str] = "archaeology"
    changes: ClassVar[frozenset] = frozenset({"dataset"})

    def validate(self) -> None:
        def bad(field: str, fix: str) -> InvalidJobSpec:
            return InvalidJobSpec("plugins", f"MetadataArchaeology({field}={getattr(self, field)!r}): {fix}")

        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise bad("k", "must be an integer >= 1 (MAP-D uses 20)")
        if self.metric not in METRICS:
            raise bad("metric", f"must be one of {METRICS}")
        suites = tuple(self.suites) if isinstance(self.suites, (tuple, list)) else None
        if not suites or any(s not in SUITES for s in suites) or len(set(suites)) != len(suites):
            raise bad("suites", f"must be distinct names from {SUITES}")
        if len(suites) < 2:
            raise bad("suites", "needs at least two suites to tell apart")
        size = self.probes_per_suite
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise bad("probes_per_suite", "must be None (the default rule) or an integer >= 1")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not self.noise > 0:
            raise bad("noise", "must be a number > 0 (the noise's standard deviation over the inputs')")
        classes = self.num_classes
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
            raise bad("num_classes", "must be None (from the dataset) or an integer >= 2")
        if isinstance(self.proxy_rounds, bool) or not isinstance(self.proxy_rounds, int) or self.proxy_rounds < 1:
            raise bad("proxy_rounds", "must be an integer >= 1")

    def requires(self) -> tuple[str, ...]:
        return ("recorder",)

    def validate_peers(self, plugins: Sequence[Plugin]) -> None:
        recorder = next(p for p in plugins if p.name == "recorder")
        if not getattr(recorder, "eval_pass", False):
            raise InvalidJobSpec("plugins", "MetadataArchaeology classifies the trajectories of the evaluation pass; "
                                 "use DynamicsRecorder() (eval_pass=True), not DynamicsRecorder(eval_pass=False)")

    # -- the dataset (every process) -----------------------------------------------------------

    def suite_size(self, num_samples: int) -> int:
        return self.probes_per_suite or suite_size(num_samples)

    def wrap_dataset(self, dataset: Any, seed: int) -> ProbedDataset:
        n = len(dataset)
        size = self.suite_size(n)
        probes = 2 * size * len(self.suites)
        if probes > n // 2 or size * len(self.suites) < self.k:
            raise InvalidJobSpec("plugins", f"MetadataArchaeology: {len(self.suites)} suites x (2 x {size}) probes do "
                                 f"not fit a dataset of {n} samples (at most half of it may be probes, and the "
                                 f"{size * len(self.suites)} reference probes must be at least k={self.k}); set "
                                 "probes_per_suite or k lower, or use a larger dataset")
        targets = all_targets(dataset) if self.num_classes is None or n <= 1_000_000 else None
        largest = int(targets.max()) if targets is not None else None
        classes = self.num_classes or largest + 1
        if largest is not None and classes <= largest:
            raise InvalidJobSpec("plugins", f"MetadataArchaeology(num_classes={classes}): the dataset has class "
                                 f"{largest}; set num_classes to at least {largest + 1}, or leave it None")
        if classes < 2 or (targets is not None and len(np.unique(targets)) < 2):
            raise InvalidJobSpec("plugins", "MetadataArchaeology needs a dataset of at least 2 classes (a mislabeled "
                                 "probe gets another class); this one has one")
        altered = AlteredProbes.draw(n, classes, seed, size, tuple(s for s in self.suites if s in ALTERED))
        return ProbedDataset(dataset, altered, float(self.noise), seed)

    # -- master half -----------------------------------------------------------------------------

    def on_attach(self, job: PluginJob) -> None:
        if job.run_dir is None:
            raise InvalidJobSpec("plugins", "MetadataArchaeology writes its probes into the run directory; pass "
                                 "checkpoint_dir")
        if not isinstance(job.dataset, ProbedDataset):
            raise InvalidJobSpec("plugins", "MetadataArchaeology plants its probes in the dataset the job builds; "
                                 "this master was given an unwrapped one (build it with vnodes.runtime.engine."
                                 "build_dataset)")
        self._job = job
        self._recorder = job.peers["recorder"]
        t0 = time.perf_counter()
        self.probes = build_suites(job.dataset, self.suites, self.suite_size(job.num_samples), job.seed,
                                   self.proxy_rounds)
        log.info("metadata archaeology: %d probes in %d suites (%.1f s)",
                 sum(len(v) for v in self.probes.probes().values()), len(self.suites), time.perf_counter() - t0)
        directory = Path(job.run_dir) / DIRECTORY
        try:
            directory.mkdir(exist_ok=True)
            self.probes.write(directory / PROBES, {"k": self.k, "metric": self.metric})
        except OSError as exc:
            raise StorageError.from_os_error("the probe suites", directory, exc) from exc
        self.p: Optional[np.ndarray] = None  # [N, suites] after a fit
        self.fitted = 0  # epochs of the fit in self.p

    def usable_epochs(self, step: int) -> int:
        """Epochs of trajectory a decision for ``step`` may use: those whose evaluation pass had
        committed before ``step`` was planned in a run that never stopped (the pass after epoch
        ``e`` rides on the first step of epoch ``e + 1``, so it counts from the second on). A
        function of the step alone, so a run stopped and resumed at any step decides the same."""
        return max(0, (step - 1) // self._job.steps_per_epoch)

    def p_for_step(self, step: int) -> Optional[np.ndarray]:
        """p(suite) of every sample ``[N, suites]`` as decisions for ``step`` see it (fitted on
        ``usable_epochs(step)`` epochs, once per epoch); None before the first epoch's pass."""
        epochs = self.usable_epochs(step)
        if epochs == 0:
            return None
        if self.fitted != epochs:
            self.fit(epochs)
        return self.p

    def fit(self, epochs: int) -> None:
        """p(suite) for every sample, from the first ``epochs`` epochs of the evaluation pass."""
        table = self._recorder.table("eval", "loss")[:, :epochs]
        if table.shape[1] < epochs:
            raise RuntimeError(f"MetadataArchaeology: {epochs} epochs asked, {table.shape[1]} recorded")
        idx, labels = self.probes.reference_labels()
        self.p = knn_proba(np.ascontiguousarray(table[idx]), labels, table, num_classes=len(self.probes.suites),
                           k=self.k, metric=self.metric)
        self.fitted = epochs

    def probability(self, suite: str, step: int) -> Optional[np.ndarray]:
        """p(``suite``) of every sample as decisions for ``step`` see it; None before the first
        fit; zeros for a suite this job does not plant."""
        p = self.p_for_step(step)
        if p is None:
            return None
        return p[:, self.probes.suites.index(suite)] if suite in self.probes.suites else \
            np.zeros(self._job.num_samples, np.float32)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p, self.fitted = None, 0  # refitted on demand (p_for_step), from the recorder's rows
