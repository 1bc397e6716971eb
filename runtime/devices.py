"""Which device a worker computes on: a pure decision, resolved once per worker process.

Three sources, each for what it knows::

    the job's device (JobSpec.device)   the device *type* every worker honours: "cpu" | "cuda" | "cuda:K" | None
    the worker's own device (--device)  which device of that type on this machine: the launcher's assignment
                                        ("cuda:i" for local worker i), a Ray actor's GPU, or the operator's choice
    this process's local index          what a bare "cuda" means without either: LOCAL_RANK, else the current
                                        device (cuda:0 in a fresh worker process)

Rules (``choose_device``):

1. The type is the job's, if it names one; else the worker's; else CUDA when this machine has a
   usable device, else the CPU. A worker flag of another type than the job's is overridden (the job
   fixes the device type: deterministic results are promised on one type).
2. On the CPU: ``"cpu"``.
3. On CUDA the index is the worker's (its launch assignment), else the job's (``"cuda:K"``: meant for
   one process), else the local index. The answer always carries an index, ``"cuda:K"``, so that
   ``torch.cuda.set_device`` accepts it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import InvalidJobSpec


def _parse(name: str, value: Optional[str], setting: str) -> Optional[torch.device]:
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidJobSpec(setting, f"{value!r} is not a device ({exc}); use cpu, cuda or cuda:K") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidJobSpec(setting, f"{value!r}: {name} must be cpu, cuda or cuda:K")
    return device


def choose_device(job_device: Optional[str], worker_device: Optional[str], cuda_count: int,
                  local_index: int = 0) -> str:
    """The device this worker computes on, ``"cpu"`` or ``"cuda:K"`` (see the module docstring).

    ``cuda_count``: the CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` already applied);
    ``local_index``: what a bare ``"cuda"`` means when the worker has no device of its own.

    Raises:
        InvalidJobSpec: a device is not one, or names CUDA (or an index) this machine lacks.
    """
    job = _parse("the job's device", job_device, "device")
    own = _parse("the worker's device", worker_device, "--device")
    kind = job.type if job is not None else own.type if own is not None else ("cuda" if cuda_count else "cpu")
    if kind == "cpu":
        return "cpu"
    if cuda_count <= 0:
        asked, setting = (job_device, "device") if job is not None else (worker_device or "cuda", "--device")
        raise InvalidJobSpec(setting, f"{asked!r}: this machine has no usable CUDA device; use cpu")
    if own is not None and own.type == "cuda" and own.index is not None:
        index, setting = own.index, "--device"
    elif job is not None and job.index is not None:
        index, setting = job.index, "device"
    else:
        index, setting = local_index, "LOCAL_RANK"
    if not 0 <= index < cuda_count:
        shown = f"LOCAL_RANK={index}" if setting == "LOCAL_RANK" else f"cuda:{index}"
        raise InvalidJobSpec(setting, f"{shown}: this machine has {cuda_count} CUDA device(s), cuda:0 to "
                             f"cuda:{cuda_count - 1} (CUDA_VISIBLE_DEVICES applied); pass --device cuda:K")
    return f"cuda:{index}"
