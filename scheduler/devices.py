"""Which device each local worker gets: a pure decision, made by the local launcher before it starts any.

    assign_devices(workers=4, visible_devices=8)               -> ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assign_devices(2, 8, requested=[0, 2])                     -> ["cuda:0", "cuda:2"]
    assign_devices(4, 2, share=True)                           -> ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assign_devices(4, 2)                                       -> DevicesUnavailable (names 4, 2 and the fix)
    assign_devices(3, 0)                                       -> ["cpu", "cpu", "cpu"]

Rules:

- Device numbers are torch's: indices among the devices this process sees, so ``CUDA_VISIBLE_DEVICES``
  applies first (with ``CUDA_VISIBLE_DEVICES=4,5``, ``cuda:0`` is physical GPU 4). Workers inherit it.
- The job's device fixes the type: ``"cpu"`` puts every worker on the CPU (asking for devices then is
  an error); ``"cuda:K"`` with no ``requested`` means ``requested=[K]``; ``"cuda"`` needs a GPU;
  ``None`` means GPUs when there are any, else the CPU.
- The pool is ``requested`` (in the order given), else every visible device. Worker ``i`` gets the
  ``i``-th device of the pool: one device per worker.
- More workers than devices in the pool is an error, unless ``share``: then worker ``i`` gets device
  ``i % len(pool)`` (several processes on one GPU: each holds its own copy of the model).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import torch

from vnodes.runtime.spec import JobSpec

from .errors import DevicesUnavailable


def assign_devices(workers: int, visible_devices: int, requested: Optional[Sequence[int]] = None,
                   share: bool = False, job_device: Optional[str] = None) -> list[str]:
    """The device of each of ``workers`` local workers (``"cpu"`` or ``"cuda:K"``), by the rules above.

    ``visible_devices``: the CUDA devices this process sees (0 on a machine without a usable GPU).

    Raises:
        DevicesUnavailable: a requested device is missing or repeated, the job's device type cannot be
            given, or there are more workers than devices without ``share``.
    """
    kind = torch.device(job_device).type if job_device is not None else None
    if kind == "cpu":
        if requested:
            raise DevicesUnavailable(f"--devices {_listed(requested)} asks for GPUs, but the job's device is "
                                     f"'cpu'; drop --devices, or set the job's device to cuda (--set device=cuda)")
        return ["cpu"] * workers
    named = "--devices"  # who chose the pool, for the messages
    if requested is None and job_device is not None and torch.device(job_device).index is not None:
        requested, named = [torch.device(job_device).index], f"the job's device {job_device!r}"
    if visible_devices <= 0:
        if requested or kind == "cuda":
            what = f"--devices {_listed(requested)}" if requested else f"the job's device {job_device!r}"
            raise DevicesUnavailable(f"{what} asks for GPUs, but this process sees none (CUDA unavailable, or "
                                     "CUDA_VISIBLE_DEVICES empty); run on a machine with GPUs, or on the CPU")
        return ["cpu"] * workers
    if requested is not None:
        if not requested:
            raise DevicesUnavailable("--devices is empty; name at least one device, e.g. --devices 0")
        missing = [d for d in requested if not 0 <= d < visible_devices]
        if missing:
            raise DevicesUnavailable(f"--devices {_listed(requested)}: no device {_listed(missing)} here; this "
                                     f"process sees {visible_devices} GPU(s), 0 to {visible_devices - 1} "
                                     "(numbered within CUDA_VISIBLE_DEVICES)")
        repeated = sorted({d for d in requested if list(requested).count(d) > 1})
        if repeated:
            raise DevicesUnavailable(f"--devices {_listed(requested)} names {_listed(repeated)} more than once; "
                                     "to put several workers on one GPU, pass --share-devices instead")
    pool = list(requested) if requested is not None else list(range(visible_devices))
    if workers > len(pool) and not share:
        which = "visible" if requested is None else named if named != "--devices" else f"--devices {_listed(pool)}"
        raise DevicesUnavailable(f"--workers {workers} needs {workers} GPUs, but {len(pool)} are available "
                                 f"({which}); run at most --workers {len(pool)}, or pass --share-devices to put "
                                 f"several workers on one GPU")
    return [f"cuda:{pool[i % len(pool)]}" for i in range(workers)]


def visible_cuda_devices() -> int:
    """The CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _listed(devices: Sequence[int]) -> str:
    return ",".join(str(d) for d in devices)


def on_first_device(spec: JobSpec, requested: Sequence[int]) -> JobSpec:
    """``spec`` set to run on the first of the ``requested`` GPUs: one worker, in this process
    (``vnodes run --devices I`` without ``--workers``).

    Raises:
        DevicesUnavailable: as ``assign_devices``.
    """
    return dataclasses.replace(spec, device=assign_devices(1, visible_cuda_devices(), requested,
                                                           job_device=spec.device)[0])


def parse_device_list(text: str) -> list[int]:
    """``"0,2"`` as ``[0, 2]`` (an argparse type: a bad list is refused with what is wrong)."""
    devices = []
    for part in text.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of GPU numbers, e.g. 0,2")
        devices.append(int(part))
    return devices
