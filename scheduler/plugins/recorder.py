"""``DynamicsRecorder``: every sample's loss (and true-class probability and margin) at every epoch.

Two sources, each a samples x epochs table:

- ``"train"``: what the training pass computed for each sample the one time it saw it in the epoch
  (free: the loss is computed anyway);
- ``"eval"`` (``eval_pass=True``, the default): an evaluation pass over the whole training set with
  the weights at the end of each epoch, as MAP-D does (Siddiqui et al., 2023). It is sharded across
  virtual nodes and workers, runs in eval mode under ``no_grad``, and touches neither running
  statistics nor random streams (``runtime/plugins.py``).

Storage, in ``RUN_DIR/dynamics/``: one raw float32 file per source and signal
(``eval.loss.f32``...), epoch-major (row ``e`` is epoch ``e``: appending an epoch is one sequential
write), and ``meta.json``, which says how many rows of each source are complete. An epoch's row is
written and fsynced before ``meta.json`` is replaced (atomically) to count it, so a reader, or a
run killed at any moment, sees whole epochs only. Nothing holds the whole table in memory: the
master keeps the current epoch's row (4 bytes per sample per signal) and ``load_dynamics`` maps the
files. Unseen entries are NaN. The current epoch's partial row is part of the plugin's state, so it
travels in checkpoints and a resumed run records bitwise the same table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch

from vnodes.runtime.errors import InvalidJobSpec, StorageError
from vnodes.runtime.plugins import (Plugin, PluginJob, SampleBatch, SampleColumns, WorkerHalf,
                                    classification_signals)

FORMAT = 1
DIRECTORY = "dynamics"
META = "meta.json"
DEFAULT_EVAL_BATCH = 256  # samples per virtual node per evaluation batch


class RecorderWorker(WorkerHalf):
    """Packs a step's (or an evaluation chunk's) per-sample signals into one report."""

    def __init__(self, signals: Optional[Callable[[Any, Any], dict]]):
        self.signals = signals

    def report(self, batches: list[SampleBatch]) -> Optional[SampleColumns]:
        indices = torch.cat([b.indices for b in batches])
        columns = {"loss": torch.cat([b.loss.reshape(-1) for b in batches]).float()}
        outputs, targets = [b.outputs for b in batches], [b.targets for b in batches]
        extra = None
        if self.signals is not None:
            extra = self.signals(_cat(outputs), _cat(targets))
        elif _is_classification(outputs[0], targets[0]):
            extra = classification_signals(_cat(outputs), _cat(targets))
            extra.pop("pred")
        for name, values in (extra or {}).items():
            columns[name] = values.detach().reshape(-1).float()
        # One copy to the host for every column (each copy from a GPU waits for the step's kernels).
        host = torch.stack(list(columns.values())).cpu().numpy()
        return SampleColumns(indices.numpy(), dict(zip(columns, host)))


def _cat(parts: list) -> Any:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _is_classification(outputs: Any, targets: Any) -> bool:
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor) and outputs.ndim == 2
            and targets.ndim == 1 and not targets.is_floating_point() and not targets.is_complex())


@dataclasses.dataclass
class DynamicsRecorder(Plugin):
    """Record training dynamics: per-sample loss each epoch, plus the true-class probability and the
    margin (that probability minus the largest other class's) when the model returns logits
    ``[n, C]`` for integer targets ``[n]``.

    Args:
        eval_pass: also evaluate every training sample at the end of each epoch (MAP-D's source);
            ``load_dynamics`` then returns that source by default.
        eval_batch_size: samples per virtual node in each batch of that pass (default 256).
        signals: ``(outputs, targets) -> {name: per-sample tensor}``, picklable, for models whose
            outputs are not plain logits: what to record besides the loss.
    """

    eval_pass: bool = True
    eval_batch_size: Optional[int] = None
    signals: Optional[Callable[[Any, Any], dict]] = None

    name: ClassVar[str] = "recorder"

    def validate(self) -> None:
        if not isinstance(self.eval_pass, bool):
            raise InvalidJobSpec("plugins", f"DynamicsRecorder(eval_pass={self.eval_pass!r}): must be True or False")
        size = self.eval_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise InvalidJobSpec("plugins", f"DynamicsRecorder(eval_batch_size={size!r}): must be None or an "
                                 "integer >= 1")
        if self.signals is not None and not callable(self.signals):
            raise InvalidJobSpec("plugins", f"DynamicsRecorder(signals={self.signals!r}): must be a callable "
                                 "(outputs, targets) -> {name: per-sample tensor}, or None")

    def describe(self) -> str:
        from vnodes.runtime.spec import describe

        return (f"{type(self).__module__}.DynamicsRecorder(eval_pass={self.eval_pass}, "
                f"eval_batch_size={self.eval_batch_size}, signals={describe(self.signals)})")

    # -- worker half -------------------------------------------------------------------------

    def worker_half(self) -> WorkerHalf:
        return RecorderWorker(self.signals)

    def eval_pass_batch_size(self) -> Optional[int]:
        return (self.eval_batch_size or DEFAULT_EVAL_BATCH) if self.eval_pass else None

    # -- master half -------------------------------------------------------------------------

    def on_attach(self, job: PluginJob) -> None:
        if job.run_dir is None:
            raise InvalidJobSpec("plugins", "DynamicsRecorder writes into the run directory; pass checkpoint_dir")
        self._job = job
        self._store = DynamicsStore(Path(job.run_dir) / DIRECTORY, job.num_samples)
        self._row: dict[str, np.ndarray] = {}  # the current epoch's training-pass row, per signal
        self._row_epoch = 0

    def on_step_committed(self, step: int, report: Optional[SampleColumns]) -> None:
        spe = self._job.steps_per_epoch
        epoch = step // spe
        if report is not None:
            if epoch != self._row_epoch:
                self._row, self._row_epoch = {}, epoch
            for name, values in report.columns.items():
                row = self._row.get(name)
                if row is None:
                    row = self._row[name] = np.full(self._job.num_samples, np.nan, np.float32)
                row[report.indices] = values
        if (step + 1) % spe == 0:  # the epoch is complete: its row goes to disk
            if self._row:
                self._store.write_epoch("train", epoch, self._row)
            self._row, self._row_epoch = {}, epoch + 1

    def on_eval(self, epoch: int, report: Optional[SampleColumns]) -> None:
        if report is None:
            return
        row = {}
        for name, values in report.columns.items():
            row[name] = np.full(self._job.num_samples, np.nan, np.float32)
            row[name][report.indices] = values
        self._store.write_epoch("eval", epoch, row)

    def table(self, source: str = "eval", signal: str = "loss") -> np.ndarray:
        """Master half: what has been recorded so far, ``[num_samples, complete epochs]`` (a view of
        the file), for the plugins that come after this one (e.g. ``MetadataArchaeology``)."""
        return self._store.table(source, signal)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": dict(self._store.epochs), "row_epoch": self._row_epoch,
                "row": {name: torch.from_numpy(row.copy()) for name, row in self._row.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._row_epoch = int(state.get("row_epoch", 0))
        self._row = {name: t.numpy().astype(np.float32, copy=True) for name, t in state.get("row", {}).items()}
        self._store.roll_back({k: int(v) for k, v in state.get("epochs", {}).items()})


class DynamicsStore:
    """The on-disk tables (module docstring): ``write_epoch`` appends a row, ``meta.json`` counts."""

    def __init__(self, directory: Path, num_samples: int):
        self.directory = directory
        self.num_samples = num_samples
        try:
            directory.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError.from_os_error("the dynamics directory", directory.parent, exc) from exc
        meta = read_meta(directory)
        if meta is not None and meta["num_samples"] != num_samples:
            raise InvalidJobSpec("plugins", f"{directory} records {meta['num_samples']} samples, this job's dataset "
                                 f"has {num_samples}; use another run directory")
        self.epochs: dict[str, int] = dict(meta["epochs"]) if meta else {}
        self.signals: dict[str, list[str]] = dict(meta["signals"]) if meta else {}

    def write_epoch(self, source: str, epoch: int, row: dict[str, np.ndarray]) -> None:
        """Row ``epoch`` of ``source``, every signal, then count it (atomically)."""
        names = sorted(row)
        try:
            for name in names:
                path = self.directory / f"{source}.{name}.f32"
                with open(path, "r+b" if path.exists() else "w+b") as f:
                    f.seek(epoch * self.num_samples * 4)
                    f.write(np.ascontiguousarray(row[name], dtype="<f4").tobytes())
                    f.flush()
                    os.fsync(f.fileno())
            self.epochs[source] = epoch + 1
            self.signals[source] = sorted(set(self.signals.get(source, [])) | set(names))
            self._write_meta()
        except OSError as exc:
            raise StorageError.from_os_error(f"the {source} dynamics of epoch {epoch}", self.directory, exc) from exc

    def table(self, source: str, signal: str = "loss") -> np.ndarray:
        """The complete epochs of ``source``'s ``signal``: a read-only float32 view
        ``[num_samples, epochs]`` of the file (not loaded into memory)."""
        epochs = self.epochs.get(source, 0)
        if epochs == 0:
            return np.zeros((self.num_samples, 0), np.float32)
        path = self.directory / f"{source}.{signal}.f32"
        return np.memmap(path, dtype="<f4", mode="r", shape=(epochs, self.num_samples)).T

    def roll_back(self, epochs: dict[str, int]) -> None:
        """Count only the epochs a checkpoint had recorded (the later rows are recorded again)."""
        if epochs != self.epochs:
            self.epochs = dict(epochs)
            try:
                self._write_meta()
            except OSError as exc:
                raise StorageError.from_os_error("the dynamics' meta.json", self.directory, exc) from exc

    def _write_meta(self) -> None:
        tmp = self.directory / (META + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "num_samples": self.num_samples, "epochs": self.epochs,
                       "signals": self.signals}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / META)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_meta(directory: Path) -> Optional[dict[str, Any]]:
    path = directory / META
    if not path.exists():
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this vnodes reads format {FORMAT}")
    return meta


@dataclasses.dataclass
class Dynamics:
    """A recorded table. Arrays are ``[num_samples, epochs]`` float32 views of the files (not loaded
    into memory); NaN where a sample was not recorded. ``true_prob`` and ``margin`` are None when
    the job's outputs were not classification logits (and no ``signals`` were given)."""

    source: str  # "eval" or "train"
    epochs: int  # complete epochs recorded
    num_samples: int
    loss: np.ndarray
    true_prob: Optional[np.ndarray]
    margin: Optional[np.ndarray]
    signals: dict[str, np.ndarray]  # every recorded signal by name (loss, true_prob, margin, custom ones)


def load_dynamics(run_dir: str | os.PathLike, source: Optional[str] = None) -> Dynamics:
    """The dynamics a ``DynamicsRecorder`` recorded in ``run_dir``.

    Args:
        source: ``"eval"`` (the end-of-epoch evaluation pass) or ``"train"`` (the training pass);
            default: ``"eval"`` if it was recorded, else ``"train"``.

    Raises:
        FileNotFoundError: ``run_dir`` holds no recording (was the recorder enabled, and the run
            given this directory as ``checkpoint_dir``?).
        ValueError: ``source`` is not one that was recorded.
    """
    directory = Path(run_dir) / DIRECTORY
    meta = read_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no training dynamics in {run_dir} ({directory / META} is missing): enable "
                                "JobSpec(plugins=[DynamicsRecorder()]) and pass this directory as checkpoint_dir")
    recorded = sorted(meta["signals"])
    if source is None:
        source = "eval" if "eval" in meta["signals"] else "train"
    if source not in meta["signals"]:
        raise ValueError(f"source {source!r} was not recorded in {run_dir}; recorded: {recorded or 'none yet'}")
    n, epochs = meta["num_samples"], int(meta["epochs"].get(source, 0))
    signals = {}
    for name in meta["signals"][source]:
        path = directory / f"{source}.{name}.f32"
        if epochs == 0:
            signals[name] = np.zeros((n, 0), np.float32)
            continue
        table = np.memmap(path, dtype="<f4", mode="r", shape=(epochs, n))
        signals[name] = table.T
    return Dynamics(source, epochs, n, signals["loss"], signals.get("true_prob"), signals.get("margin"), signals)
