"""``train``: run a ``JobSpec`` for a number of global steps, resuming from a checkpoint directory."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any, Iterator, Optional, Sequence

import torch

from .checkpoint import check_checkpoint_dir
from .errors import InvalidJobSpec
from .events import Callback
from .spec import JobSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    model_state_dict: dict[str, torch.Tensor]  # final parameters and buffers, plain names
    losses: list[float]  # per-step mean training loss over the whole run (resumed steps included)
    steps: int
    checkpoint_dir: Optional[str] = None
    wall_time_s: float = 0.0  # this call only
    samples_per_s: float = 0.0  # this call only
    evaluations: list[dict] = dataclasses.field(default_factory=list)  # {"step": s, metric: mean} (JobSpec.eval_dataset)


@contextlib.contextmanager
def execution_context(spec: JobSpec) -> Iterator[None]:
    """Thread count and determinism switches for the job; the caller's settings come back after."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    bench = torch.backends.cudnn.benchmark
    if spec.effective_num_threads() is not None:
        torch.set_num_threads(spec.effective_num_threads())
    if spec.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.backends.cudnn.benchmark = bench


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidJobSpec(name, f"must be an integer >= {minimum}, got {value!r}")


def train(
    spec: JobSpec,
    steps: int,
    checkpoint_dir: Optional[str | os.PathLike] = None,
    *,
    checkpoint_every: Optional[int] = None,
    workers: int = 1,
    callbacks: Sequence[Callback] = (),
    progress: Optional[bool] = None,
    keep_checkpoints: int = 2,
    launcher: str = "local",
    address: Optional[str] = None,
    launch_options: Optional[dict[str, Any]] = None,
) -> TrainResult:
    """Train ``spec`` until ``steps`` global steps have been applied.

    With ``checkpoint_dir``, resume from its latest checkpoint (refused if the job differs in a
    trajectory field), write one every ``checkpoint_every`` steps and one at the end.

    Args:
        steps: total global steps of the run (not additional steps when resuming).
        workers: physical workers; 1 runs the master and every virtual node in this process and
            thread (no sockets), more start a master here and that many local worker processes (same
            trajectory).
        launcher: ``"local"`` (processes on this machine) or ``"ray"`` (one actor per device of a Ray
            cluster, following the cluster as nodes come and go; ``workers`` caps their number).
        address: for ``launcher="ray"``: ``"auto"``, ``"HOST:PORT"``, or ``None`` to start Ray locally.
        launch_options: extra launcher settings: local: ``placement`` ("throughput" | "even"),
            ``worker_env``, ``devices`` (the GPUs, one per worker: worker i on the i-th; default every
            visible one) and ``share_devices`` (allow more workers than GPUs); ray: ``worker_options`` (``RayWorkerOptions``), ``ray_init_kwargs``; both:
            ``code`` (a ``vnodes.scheduler.code_package.CodePackage``), the code every worker
            imports the job from, by default the folder of the script run as ``python script.py``
            (see ``scheduler/code_package.py`` for what is left out and the size cap).
        progress: show a live progress display; ``None`` shows it when stderr is a terminal.

    Raises:
        InvalidJobSpec: bad input, before any training.
        CodeTooLarge: with workers in other processes, the launching script's folder passes the
            cap on the code shipped to them (``VNODES_MAX_CODE_BYTES``), before any training.
        CheckpointMismatch: ``checkpoint_dir`` holds a checkpoint of a different job.
        NonFiniteLoss: a virtual node's loss was NaN or infinite; that step was not applied.
        StorageError: a checkpoint could not be written (``checkpoint_dir`` read-only or full). The
            run stops there (no temporary file left); the same call resumes from the last checkpoint
            once the directory is fixed.
    """
    spec.validate()
    _check_int("steps", steps, 0)
    _check_int("checkpoint_every", checkpoint_every, 1, allow_none=True)
    _check_int("workers", workers, 1)
    _check_int("keep_checkpoints", keep_checkpoints, 1)
    if workers > spec.virtual_nodes:
        raise InvalidJobSpec(
            "workers", f"{workers} workers for {spec.virtual_nodes} virtual nodes would leave some idle; "
            f"use at most virtual_nodes={spec.virtual_nodes} workers"
        )
    directory = check_checkpoint_dir(checkpoint_dir)
    if spec.loader_workers > 0:
        spec.check_picklable("loader_workers > 0 (spawned data-loader processes)")

    callbacks = list(callbacks)
    if progress or (progress is None and sys.stderr.isatty()):
        from .progress import ProgressDisplay

        callbacks.append(ProgressDisplay())
    if launcher not in ("local", "ray"):
        raise InvalidJobSpec("launcher", f"{launcher!r}: use 'local' or 'ray'")
    if launcher == "ray":
        from vnodes.scheduler.launcher_ray import train_ray  # Ray is needed by this launcher only

        return train_ray(spec, steps, directory, checkpoint_every, callbacks, address=address,
                         max_workers=workers if workers > 1 else None, **(launch_options or {}))
    if workers > 1:
        from vnodes.scheduler.launcher import train_local  # the master lives on the scheduler side

        return train_local(spec, steps, workers, directory, checkpoint_every, callbacks, **(launch_options or {}))

    from vnodes.scheduler.direct import train_in_process  # one master for every mode, here in process

    return train_in_process(spec, steps, directory, checkpoint_every, callbacks, keep_checkpoints)
