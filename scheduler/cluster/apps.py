"""Application profiles: how long one training step takes, and how many steps a job needs.

A cluster simulator advances each job by ``elapsed_s / step_time(placement, global_batch)`` steps
and finishes it after ``steps_to_complete(global_batch)``. vnodes never changes a job's global
batch, so both numbers are taken at the job's fixed global batch.

Two kinds of profile, one interface (:class:`JobProfile`):

* :class:`Application` -- Pollux's measured applications (``traces/pollux/applications/<app>/``).
  It follows what Pollux's simulator does (``simulator/applications.py`` and ``Job`` in
  ``simulator/simulator.py`` on the ``osdi21-artifact`` branch of github.com/petuum/adaptdl),
  re-implemented here, not copied:

  - **Local batch and accumulation** (``Job.update_local_bsz``). For ``r`` GPUs and global batch
    ``B``: ``local = ceil(B / r)``; ``accum_steps = ceil(local / max_local_bsz) - 1``;
    ``atomic_bsz = ceil(local / (accum_steps + 1))``, then capped at
    ``floor(max_batch_size / (r * (accum_steps + 1)))``. ``max_local_bsz`` is the largest
    ``local_bsz`` in ``placements.csv`` (8 for yolov3, set by hand in Pollux's ``APPLICATIONS``);
    ``max_batch_size`` the largest ``validation-<bsz>.csv``. One quirk is kept on purpose: with
    ``r == 1`` and ``B`` above the application's initial (smallest validated) batch size, Pollux
    forces ``accum_steps >= 1`` (so a 1-GPU ncf job at 32,768 runs two micro-batches of 16,384).
  - **Time per iteration** (``Job.step``): ``(step, sync) = measured(placement, atomic_bsz)`` and
    ``step_time = step + accum_steps * (step - sync)``: each extra micro-batch costs the compute
    part only; gradients are synchronised once per iteration (``sync_time`` is the part of a step
    not overlapped with compute).
  - **Which file** (``Application.get_throughput``): the placement (GPUs per node; empty nodes
    dropped) is normalised to its lexicographically smallest rotation (``(4, 2)`` -> ``24``, not
    sorted) and looked up in ``placements.csv`` (every placement of 1-4 nodes with 1-4 GPUs each
    is there). If present: linear interpolation in ``local_bsz`` between that placement's
    measured rows (``scipy.interpolate.interp1d``; no extrapolation). Otherwise (5+ nodes):
    ``scipy.interpolate.LinearNDInterpolator`` over ``(num_nodes, num_replicas, local_bsz)``
    fitted to ``placements.csv`` rows averaged per ``(num_nodes, num_replicas, local_bsz)`` plus
    every row of ``scalability.csv`` (6-16 nodes); ``num_nodes`` is capped at 16. That needs
    scipy, imported only when such a placement is asked for.

  - **Total work** (``Job.step`` with ``Application.get_progress/get_grad_stats/
    get_completion_epoch``). Completion is not an iteration count: a job accrues *progress*
    (statistically efficient iterations at the initial batch size) at ``gain`` per iteration,
    ``gain = (var + sqr) / (var / s + sqr)`` with ``s = B / init_batch_size`` and ``(sqr, var)``
    the ``grad_sqr, grad_var`` of the current epoch's row, linearly interpolated in batch size
    between the two validated files around ``B`` (``B`` outside them is an error). Epoch ``e``
    ends at progress ``P(e + 1) = min over all files of progress[e]``. No application sets a
    target metric, so every job completes when its epoch counter passes ``max_epochs - 1``,
    i.e. at progress ``P(max_epochs)`` (``max_epochs``: bert 2, cifar10 100, ncf 10, imagenet 90,
    deepspeech2 80, yolov3 50 -- also the number of rows of each file). For a fixed batch size
    the gain depends only on the epoch, so the work is a step count:
    ``steps_to_complete(B) = ceil(sum_e (P(e + 1) - P(e)) / gain_e(B))``. At the initial batch
    size (gain 1) that is the last row's progress, within one step; at larger batch sizes it
    exceeds the file's own ``iteration`` column (cifar10 2048: 3,344 vs 3,178; yolov3 64: 15,971
    vs 14,577): that column only served Pollux's workload generator (``workload.py``,
    ``get_configurations``) to pick each job's ``(num_replicas, batch_size)``, never completion.
    Two deliberate differences from Pollux's published runs: (a) Pollux computes ``s`` from the
    realised batch ``r * atomic_bsz * (accum_steps + 1)``, which the ceilings and the cap move
    off ``B`` (2,052 for 2,048 on 6 GPUs; 360 for bert's 384 on 6 or 12 GPUs, which then needs
    508 steps, not 477); vnodes trains at exactly ``B``. (b) Pollux rounds the time to cross each
    epoch boundary to whole seconds, +2% for 100-epoch cifar10 jobs; a simulator may add that.

* :class:`VirtualFlowProfile` -- one per job configuration of VirtualFlow's ``medium_workload()``
  (``traces/virtualflow/durations.csv``). VirtualFlow's traces give no durations and its jobs
  (TensorFlow ResNet, BERT GLUE fine-tuning, Transformer, on V100s) are not Pollux's applications,
  so no Pollux profile is reused. Its development logs do measure each ``medium20_12jph``
  configuration (priority scheduler, every job at its full ``gpu_demand``, one host of 8 V100):
  ``duration_s`` is that measured wall time (20 of the 48 configurations); the others take the
  author's ``# N mins`` note times the median measured/noted ratio of the 20 (1.29; single ratios
  spread 0.72-2.73, so these are rough). The model:
  ``duration_s = startup_s + target_steps * step_time_at_demand``, where ``startup_s = 88`` s is
  the mean launch-to-first-report time of the WFS log's 8 fresh starts (70-106 s), charged by
  the simulator at a start, not here. On ``k`` GPUs a step takes
  ``step_time_at_demand * ceil(V / k) / (V / gpu_demand)`` for ``V = gpu_demand *
  num_virtual_nodes_per_device`` virtual nodes: each GPU runs its virtual nodes in turn, and the
  slowest GPU holds ``ceil(V / k)``. That is pessimistic where a job was input-bound at full
  demand: ResNet-50/ImageNet trained at 4,500-5,200 images/s on 8 GPUs but ~970 on one (not
  8x), so a shrunken ImageNet job runs faster than this model says.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path
from typing import Protocol

import numpy as np

TRACES_DIR = Path(__file__).resolve().parent / "traces"
POLLUX_APPLICATIONS_DIR = TRACES_DIR / "pollux" / "applications"
VIRTUALFLOW_DURATIONS = TRACES_DIR / "virtualflow" / "durations.csv"

# Pollux's per-application settings (``APPLICATIONS`` in simulator/applications.py): the epoch
# count that completes a job, and yolov3's hand-set largest local batch.
POLLUX_MAX_EPOCHS = {"bert": 2, "cifar10": 100, "ncf": 10, "imagenet": 90, "deepspeech2": 80,
                     "yolov3": 50}
POLLUX_MAX_LOCAL_BSZ = {"yolov3": 8}
# Pollux's scalability interpolation caps the node count (``min(num_nodes, 16)``).
POLLUX_MAX_NODES = 16

# VirtualFlow: mean launch-to-first-report of the 8 fresh starts in the WFS log of medium20_12jph
# (94.9, 100.7, 83.3, 105.8, 86.4, 69.7, 74.0, 89.4 s).
VIRTUALFLOW_STARTUP_S = 88.0
# Training-set sizes behind VirtualFlow's steps per epoch: ResNet uses ``NUM_IMAGES['train'] //
# batch_size`` (imagenet_preprocessing.py, cifar_preprocessing.py); BERT GLUE uses
# ``int(train_data_size / batch_size)`` with GLUE's published training-set sizes.
VIRTUALFLOW_DATASET_SIZES = {"imagenet": 1_281_167, "cifar10": 50_000, "CoLA": 8_551,
                             "SST-2": 67_349, "QNLI": 104_743, "MRPC": 3_668}
VIRTUALFLOW_WORKLOADS = ("resnet", "bert", "transformer")


class JobProfile(Protocol):
    """What a simulator asks of a job's application; every time is in seconds."""

    name: str

    def step_time(self, gpus_per_node: tuple[int, ...], global_batch: int) -> float:
        """Seconds per training step at this placement (GPUs per node) and global batch."""

    def steps_to_complete(self, global_batch: int) -> int:
        """Training steps a job at this fixed global batch needs to finish."""

    def throughput(self, gpus: int, global_batch: int, gpus_per_node: int = 4) -> float:
        """Training steps per second on ``gpus`` GPUs placed by :func:`consolidated_placement`."""


def consolidated_placement(gpus: int, gpus_per_node: int = 4) -> tuple[int, ...]:
    """The default placement rule: fill whole nodes first, e.g. 10 GPUs -> ``(4, 4, 2)``.

    This is how Pollux's workload generator prices a job (``get_configurations``); a real
    allocator may scatter GPUs over more nodes, and then ``step_time`` of that placement applies.
    Consolidated is not always fastest in Pollux's measurements: bert at 384 steps in 5.17 s on
    ``(4, 4)`` but 4.24 s on ``(2, 2, 2, 2)``.

    Raises:
        ValueError: if ``gpus`` or ``gpus_per_node`` is not a positive integer.
    """
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be a positive integer, got {gpus_per_node!r}")
    full, rest = divmod(gpus, gpus_per_node)
    return (gpus_per_node,) * full + ((rest,) if rest else ())


def _normalized_placement(gpus_per_node) -> tuple[int, ...]:
    """Drop empty nodes and check the rest; ``(4, 0, 2)`` -> ``(4, 2)``."""
    try:
        nodes = tuple(gpus_per_node)
    except TypeError:
        raise ValueError(f"gpus_per_node must be a tuple of GPU counts per node, "
                         f"got {gpus_per_node!r}") from None
    if any(not isinstance(g, (int, np.integer)) or g < 0 for g in nodes):
        raise ValueError(f"gpus_per_node must hold non-negative integers, got {gpus_per_node!r}")
    placement = tuple(int(g) for g in nodes if g)
    if not placement:
        raise ValueError(f"gpus_per_node {gpus_per_node!r} places no GPU; a running job needs "
                         "at least one")
    return placement


def _check_batch(global_batch) -> int:
    if not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
        raise ValueError(f"global_batch must be a positive integer, got {global_batch!r}")
    return int(global_batch)


@dataclasses.dataclass(frozen=True)
class _Curve:
    """One validation-<bsz>.csv: one row per epoch."""

    progress: np.ndarray
    iteration: np.ndarray
    grad_sqr: np.ndarray
    grad_var: np.ndarray


def _read_csv(path: Path, columns: tuple[str, ...]) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return {c: [row[c] for row in rows] for c in columns}


class Application:
    """A Pollux application profile, loaded from ``traces/pollux/applications/<name>/``.

    Read-only after construction; ``step_time`` results are cached per (placement, batch).
    """

    def __init__(self, trace_dir: Path, max_epochs: int, max_local_bsz: int | None = None):
        trace_dir = Path(trace_dir)
        self.name = trace_dir.name
        cols = _read_csv(trace_dir / "placements.csv",
                         ("placement", "local_bsz", "step_time", "sync_time"))
        rows: dict[tuple[int, ...], list[tuple[int, float, float]]] = {}
        for p, b, st, sy in zip(cols["placement"], cols["local_bsz"], cols["step_time"],
                                cols["sync_time"]):
            rows.setdefault(tuple(int(c) for c in p), []).append((int(b), float(st), float(sy)))
        # placement -> (local_bsz, step_time, sync_time) arrays sorted by local_bsz
        self._placements = {p: tuple(np.array(v) for v in zip(*sorted(r)))
                            for p, r in rows.items()}
        self._scalability = _read_csv(trace_dir / "scalability.csv",
                                      ("num_nodes", "num_replicas", "local_bsz", "step_time",
                                       "sync_time"))
        curves = {}
        for path in trace_dir.glob("validation-*.csv"):
            bsz = int(path.stem.split("-")[-1])
            c = _read_csv(path, ("progress", "iteration", "grad_sqr", "grad_var"))
            curves[bsz] = _Curve(*(np.array(c[k], dtype=float)
                                   for k in ("progress", "iteration", "grad_sqr", "grad_var")))
        if not curves:
            raise ValueError(f"{trace_dir}: no validation-<bsz>.csv files")
        self._curves = dict(sorted(curves.items()))
        self.max_epochs = max_epochs
        if any(len(c.progress) < max_epochs for c in self._curves.values()):
            raise ValueError(f"{trace_dir}: a validation file has fewer than {max_epochs} rows")
        self.init_batch_size = min(self._curves)
        self.max_batch_size = max(self._curves)
        all_bsz = np.concatenate([v[0] for v in self._placements.values()])
        self.min_local_bsz = int(all_bsz.min())
        self.max_local_bsz = int(max_local_bsz or all_bsz.max())
        # Epoch boundaries in progress units: P[e] = min over files of progress[e - 1], P[0] = 0.
        self._epoch_progress = np.concatenate(
            [[0.0], np.min([c.progress[:max_epochs] for c in self._curves.values()], axis=0)])
        self._interpolator = None  # built on first use: only 5+ node placements need it
        self._step_cache: dict[tuple[tuple[int, ...], int], float] = {}

    def __repr__(self) -> str:
        return f"Application({self.name!r})"

    @property
    def validated_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes with a ``validation-<bsz>.csv`` file, ascending."""
        return tuple(self._curves)

    @property
    def measured_placements(self) -> tuple[tuple[int, ...], ...]:
        """The placements of ``placements.csv`` (smallest rotation), as GPUs per node."""
        return tuple(self._placements)

    def max_gpus(self, global_batch: int) -> int:
        """Most GPUs this batch can use: the local batch must stay >= the smallest measured."""
        return max(1, _check_batch(global_batch) // self.min_local_bsz)

    def micro_batches(self, gpus: int, global_batch: int) -> tuple[int, int]:
        """``(atomic_bsz, accum_steps)`` for ``gpus`` GPUs at this global batch, as Pollux does.

        Raises:
            ValueError: if ``gpus`` is not a positive integer, or the batch exceeds the largest
                validated batch size (whose cap the ceilings above must respect).
        """
        if not isinstance(gpus, (int, np.integer)) or gpus < 1:
            raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
        batch = _check_batch(global_batch)
        if batch > self.max_batch_size:
            raise ValueError(f"{self.name}: global batch {batch} exceeds the largest validated "
                             f"batch size {self.max_batch_size}; Pollux never runs it")
        local = math.ceil(batch / gpus - 1e-8)
        accum_steps = math.ceil(local / self.max_local_bsz - 1e-8) - 1
        if gpus == 1 and batch > self.init_batch_size:
            accum_steps = max(1, accum_steps)  # Pollux's single-GPU quirk, kept for fidelity
        atomic = math.ceil(local / (accum_steps + 1) - 1e-8)
        atomic = min(atomic, int(self.max_batch_size / (gpus * (accum_steps + 1))))
        return atomic, accum_steps

    def step_time(self, gpus_per_node: tuple[int, ...], global_batch: int) -> float:
        """Seconds per iteration at this placement for the fixed global batch.

        Raises:
            ValueError: for an empty or malformed placement, or a global batch too small for the
                GPU count (local batch below the smallest measured one; see ``max_gpus``).
        """
        placement = _normalized_placement(gpus_per_node)
        batch = _check_batch(global_batch)
        key = (placement, batch)
        if key not in self._step_cache:
            atomic, accum_steps = self.micro_batches(sum(placement), batch)
            step, sync = self.measured_step(placement, atomic)
            self._step_cache[key] = step + accum_steps * (step - sync)
        return self._step_cache[key]

    def measured_step(self, gpus_per_node: tuple[int, ...], local_bsz: float
                      ) -> tuple[float, float]:
        """``(step_time, sync_time)`` of one micro-batch of ``local_bsz`` per GPU, interpolated.

        Raises:
            ValueError: if ``local_bsz`` is outside what was measured for this placement.
        """
        placement = _normalized_placement(gpus_per_node)
        rotation = min(placement[i:] + placement[:i] for i in range(len(placement)))
        if rotation in self._placements:
            bsz, step, sync = self._placements[rotation]
            if not bsz[0] <= local_bsz <= bsz[-1]:
                raise ValueError(
                    f"{self.name}: local batch {local_bsz} on placement {placement} is outside "
                    f"the measured range [{bsz[0]}, {bsz[-1]}]; use a global batch and GPU count "
                    f"whose local batch falls inside it (see max_gpus)")
            return float(np.interp(local_bsz, bsz, step)), float(np.interp(local_bsz, bsz, sync))
        num_nodes = min(len(placement), POLLUX_MAX_NODES)
        step, sync = self._scalability_interpolator()([num_nodes, sum(placement), local_bsz])[0]
        if not (math.isfinite(step) and math.isfinite(sync)):
            raise ValueError(
                f"{self.name}: no measurement around {num_nodes} nodes, {sum(placement)} GPUs, "
                f"local batch {local_bsz} (outside placements.csv + scalability.csv); use fewer "
                f"GPUs or a larger global batch")
        return float(step), float(sync)

    def _scalability_interpolator(self):
        if self._interpolator is None:
            try:
                from scipy.interpolate import LinearNDInterpolator
            except ImportError as e:
                raise ImportError("placements over more than 4 nodes interpolate Pollux's "
                                  "scalability.csv with scipy; install scipy "
                                  "(pip install scipy)") from e
            groups: dict[tuple[int, int, int], list[tuple[float, float]]] = {}
            for p, (bsz, step, sync) in self._placements.items():
                for b, st, sy in zip(bsz, step, sync):
                    groups.setdefault((len(p), sum(p), int(b)), []).append((st, sy))
            points = [k for k in sorted(groups)]
            values = [np.mean(groups[k], axis=0) for k in points]
            s = self._scalability
            points += [(int(n), int(r), int(b)) for n, r, b in
                       zip(s["num_nodes"], s["num_replicas"], s["local_bsz"])]
            values += [(float(st), float(sy)) for st, sy in zip(s["step_time"], s["sync_time"])]
            self._interpolator = LinearNDInterpolator(np.array(points, dtype=float),
                                                      np.array(values, dtype=float))
        return self._interpolator

    def gain(self, global_batch: int, epoch: int) -> float:
        """Progress per iteration in ``epoch`` at this batch (statistical efficiency x scale).

        Raises:
            ValueError: if the batch is outside the validated batch sizes.
        """
        batch = _check_batch(global_batch)
        sizes = self.validated_batch_sizes
        if not sizes[0] <= batch <= sizes[-1]:
            raise ValueError(f"{self.name}: global batch {batch} is outside the validated batch "
                             f"sizes {sizes[0]}..{sizes[-1]}; Pollux cannot price its progress")
        lo = max(b for b in sizes if b <= batch)
        hi = min(b for b in sizes if b >= batch)
        sqr_lo, var_lo = self._curves[lo].grad_sqr[epoch], self._curves[lo].grad_var[epoch]
        sqr_hi, var_hi = self._curves[hi].grad_sqr[epoch], self._curves[hi].grad_var[epoch]
        if lo == hi:
            sqr, var = sqr_lo, var_lo
        else:
            w = (batch - lo) / (hi - lo)
            sqr, var = (1 - w) * sqr_lo + w * sqr_hi, (1 - w) * var_lo + w * var_hi
        scale = batch / self.init_batch_size
        return float((var + sqr) / (var / scale + sqr))

    def steps_to_complete(self, global_batch: int) -> int:
        """Iterations a job at this fixed global batch needs, by Pollux's progress definition.

        Raises:
            ValueError: if the batch is outside the validated batch sizes.
        """
        work = self._epoch_progress
        return math.ceil(sum((work[e + 1] - work[e]) / self.gain(global_batch, e)
                             for e in range(self.max_epochs)) - 1e-9)

    def measured_iterations(self, global_batch: int) -> int:
        """The ``iteration`` column of ``validation-<bsz>.csv`` at the completing epoch.

        Only for a validated batch size; Pollux's workload generator priced jobs with it, but
        completion follows ``steps_to_complete``.

        Raises:
            ValueError: if no file was measured at exactly this batch size.
        """
        if global_batch not in self._curves:
            raise ValueError(f"{self.name}: no validation file at batch {global_batch}; "
                             f"measured: {self.validated_batch_sizes}")
        return int(self._curves[global_batch].iteration[self.max_epochs - 1])

    def throughput(self, gpus: int, global_batch: int, gpus_per_node: int = 4) -> float:
        """Iterations per second on ``gpus`` GPUs filling whole nodes of ``gpus_per_node``."""
        return 1.0 / self.step_time(consolidated_placement(gpus, gpus_per_node), global_batch)


def virtualflow_steps(workload: str, batch_size: int, dataset: str = "",
                      num_epochs: int | None = None, num_steps: int | None = None) -> int:
    """Training steps of a VirtualFlow job, as its launch scripts compute them.

    transformer: ``num_steps``. resnet: ``num_epochs * (NUM_IMAGES['train'] // batch_size)``, or
    ``min(num_steps, that)`` for one epoch when ``num_steps`` is set. bert (GLUE):
    ``num_epochs * (num_steps or int(train_size / batch_size))`` -- there ``num_steps`` is steps
    *per epoch* (``run_classifier.py``), and ``num_epochs`` defaults to 1 when ``num_steps`` is set.

    Raises:
        ValueError: for an unknown workload or dataset, or a missing length.
    """
    if workload == "transformer":
        if not num_steps:
            raise ValueError("a transformer job needs num_steps")
        return int(num_steps)
    if workload not in ("resnet", "bert"):
        raise ValueError(f"unknown VirtualFlow workload {workload!r}; expected one of "
                         f"{VIRTUALFLOW_WORKLOADS}")
    if dataset not in VIRTUALFLOW_DATASET_SIZES:
        raise ValueError(f"unknown {workload} dataset/task {dataset!r}; known: "
                         f"{sorted(VIRTUALFLOW_DATASET_SIZES)}")
    if not num_epochs and not num_steps:
        raise ValueError(f"a {workload} job needs num_epochs or num_steps")
    size = VIRTUALFLOW_DATASET_SIZES[dataset]
    if workload == "resnet":
        per_epoch = size // batch_size
        if num_steps:
            return min(int(num_steps), per_epoch)
        return int(num_epochs) * per_epoch
    return int(num_epochs or 1) * int(num_steps or int(size / batch_size))


def virtualflow_profile_name(workload: str, dataset: str, gpu_demand: int, batch_size: int,
                             virtual_nodes_per_device: int, num_epochs: int | None,
                             num_steps: int | None) -> str:
    """The profile key of one VirtualFlow job configuration, e.g.
    ``vf-resnet-imagenet-8gpu-2048bs-1vn-2ep`` or ``vf-transformer-4gpu-16384bs-1vn-500st``."""
    parts = ["vf", workload] + ([dataset] if dataset else [])
    parts += [f"{gpu_demand}gpu", f"{batch_size}bs", f"{virtual_nodes_per_device}vn"]
    parts += ([f"{num_steps}st"] if num_steps else []) + ([f"{num_epochs}ep"] if num_epochs else [])
    return "-".join(parts)


@dataclasses.dataclass(frozen=True)
class VirtualFlowProfile:
    """One VirtualFlow job configuration with a duration at its full GPU demand (see module doc).

    ``step_time_at_demand_s`` is ``(duration_s - startup_s) / target_steps``; ``duration_source``
    says whether ``duration_s`` was measured or estimated from the author's note.
    """

    name: str
    workload: str
    dataset: str
    gpu_demand: int
    virtual_nodes: int
    global_batch: int
    target_steps: int
    duration_s: float
    duration_source: str  # "measured" | "estimate"
    startup_s: float = VIRTUALFLOW_STARTUP_S

    def __post_init__(self):
        if self.duration_s <= self.startup_s:
            raise ValueError(f"{self.name}: duration {self.duration_s} s does not exceed the "
                             f"startup time {self.startup_s} s")
        if self.virtual_nodes % self.gpu_demand:
            raise ValueError(f"{self.name}: {self.virtual_nodes} virtual nodes do not divide "
                             f"evenly over the demand of {self.gpu_demand} GPUs")

    @property
    def step_time_at_demand_s(self) -> float:
        return (self.duration_s - self.startup_s) / self.target_steps

    def _check(self, global_batch: int) -> None:
        if _check_batch(global_batch) != self.global_batch:
            raise ValueError(f"{self.name} was measured at global batch {self.global_batch}, "
                             f"not {global_batch}; vnodes keeps a job's batch fixed")

    def step_time(self, gpus_per_node: tuple[int, ...], global_batch: int) -> float:
        """Seconds per step on ``sum(gpus_per_node)`` GPUs of one host (topology ignored).

        Raises:
            ValueError: for another batch, or more GPUs than virtual nodes.
        """
        self._check(global_batch)
        gpus = sum(_normalized_placement(gpus_per_node))
        if gpus > self.virtual_nodes:
            raise ValueError(f"{self.name} has {self.virtual_nodes} virtual nodes and cannot use "
                             f"{gpus} GPUs")
        per_vnode_s = self.step_time_at_demand_s * self.gpu_demand / self.virtual_nodes
        return per_vnode_s * math.ceil(self.virtual_nodes / gpus)

    def steps_to_complete(self, global_batch: int) -> int:
        self._check(global_batch)
        return self.target_steps

    def throughput(self, gpus: int, global_batch: int, gpus_per_node: int = 4) -> float:
        """Steps per second on ``gpus`` GPUs (one VirtualFlow host: placement does not matter)."""
        return 1.0 / self.step_time(consolidated_placement(gpus, gpus_per_node), global_batch)


def load_virtualflow_profiles(path: Path = VIRTUALFLOW_DURATIONS) -> dict[str, VirtualFlowProfile]:
    """Profiles for every configuration of VirtualFlow's ``medium_workload()``.

    Raises:
        ValueError: if the table is malformed or has no measured row to calibrate estimates.
    """
    cols = _read_csv(Path(path), ("workload", "dataset", "gpu_demand", "batch_size", "num_epochs",
                                  "num_steps", "num_virtual_nodes_per_device", "estimate_min",
                                  "measured_s"))
    rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
    ratios = [float(r["measured_s"]) / (60 * float(r["estimate_min"]))
              for r in rows if r["measured_s"]]
    if not ratios:
        raise ValueError(f"{path}: no measured_s value to calibrate the estimates with")
    calibration = statistics.median(ratios)
    profiles = {}
    for r in rows:
        demand, batch = int(r["gpu_demand"]), int(r["batch_size"])
        vn = int(r["num_virtual_nodes_per_device"])
        epochs = int(r["num_epochs"]) if r["num_epochs"] else None
        steps = int(r["num_steps"]) if r["num_steps"] else None
        name = virtualflow_profile_name(r["workload"], r["dataset"], demand, batch, vn, epochs,
                                        steps)
        measured = bool(r["measured_s"])
        profiles[name] = VirtualFlowProfile(
            name=name, workload=r["workload"], dataset=r["dataset"], gpu_demand=demand,
            virtual_nodes=demand * vn, global_batch=batch,
            target_steps=virtualflow_steps(r["workload"], batch, r["dataset"], epochs, steps),
            duration_s=(float(r["measured_s"]) if measured
                        else 60 * float(r["estimate_min"]) * calibration),
            duration_source="measured" if measured else "estimate")
    return profiles


def load_pollux_applications(root: Path = POLLUX_APPLICATIONS_DIR) -> dict[str, Application]:
    """Pollux's six applications: bert, cifar10, deepspeech2, imagenet, ncf, yolov3."""
    return {name: Application(Path(root) / name, epochs, POLLUX_MAX_LOCAL_BSZ.get(name))
            for name, epochs in POLLUX_MAX_EPOCHS.items()}


def load_applications() -> dict[str, JobProfile]:
    """Every profile a shipped trace refers to: Pollux's applications and VirtualFlow's jobs."""
    return {**load_pollux_applications(), **load_virtualflow_profiles()}


def application_for(job, applications: dict[str, JobProfile]) -> JobProfile:
    """The profile of ``job`` (a :class:`~vnodes.scheduler.cluster.workload.TraceJob`).

    Raises:
        ValueError: if no profile of that name is loaded.
    """
    try:
        return applications[job.application]
    except KeyError:
        raise ValueError(
            f"job {job.name!r}: no profile named {job.application!r} among "
            f"{len(applications)} loaded; VirtualFlow durations exist only for the "
            f"configurations of traces/virtualflow/durations.csv -- add a row there, or pass "
            f"a profile under that name") from None
