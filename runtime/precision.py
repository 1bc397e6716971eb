"""Mixed precision: autocast per virtual node, and a gradient scaler that decides globally.

``JobSpec(precision="bf16" | "fp16")`` runs every forward and loss under ``torch.autocast`` with
that dtype (the parameters, their gradients and the optimizer stay in the model's dtype).

fp16 needs loss scaling. DDP with ``torch.amp.GradScaler`` on every rank scales each rank's loss,
all-reduces the scaled gradients, and then each rank unscales the same reduced gradients, finds the
same overflow, skips (or takes) the same step and updates its scale the same way. ``GlobalGradScaler``
does exactly that once per global step, on the reduced gradient of every virtual node of every
worker, with the same kernels ``GradScaler`` runs (``torch._amp_foreach_non_finite_check_and_unscale_``,
``torch._amp_update_scale_``): so an overflow anywhere skips the step everywhere, and the scale is
part of the job's state (checkpoints, and the state a joining worker receives), never of a worker's
history.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# torch.amp.GradScaler's defaults; JobSpec(grad_scaler={...}) overrides any of them.
SCALER_DEFAULTS = {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}


def autocast(precision: str, device: torch.device):
    """The context every forward and loss of the job runs in (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class GlobalGradScaler:
    """``GradScaler``'s arithmetic on the reduced global gradient (module docstring).

    ``scale`` multiplies each virtual node's loss before its backward pass; ``unscale_`` (before the
    commit: it changes only the step's reduced buffer, which an aborted step discards) divides the
    reduced gradients by it and says whether any is not finite; ``update`` (after the commit, once
    per applied step) grows or backs off the scale.
    """

    def __init__(self, device: torch.device, settings: Optional[dict[str, Any]] = None):
        options = {**SCALER_DEFAULTS, **(settings or {})}
        self.growth_factor = float(options["growth_factor"])
        self.backoff_factor = float(options["backoff_factor"])
        self.growth_interval = int(options["growth_interval"])
        self.device = device
        self._scale = torch.full((1,), float(options["init_scale"]), dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((1,), dtype=torch.int32, device=device)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    def unscale_(self, grads: list[torch.Tensor], nodes: int = 1) -> bool:
        """Divide ``grads`` by the scale (and by ``nodes``: summed scaled node gradients make the
        mean) in place; True if any element is inf or NaN (the step is then skipped on every
        worker: they all hold the same reduced gradients)."""
        found_inf = torch.zeros((1,), dtype=torch.float32, device=self.device)
        inv_scale = (self._scale.double() * nodes).reciprocal().float()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        self._found_inf = found_inf
        return bool(found_inf.item())

    def update(self) -> None:
        """After an applied (or skipped) step: back off on overflow, grow after ``growth_interval``
        clean steps, as ``GradScaler.update`` does."""
        torch._amp_update_scale_(self._scale, self._growth_tracker, self._found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self._scale.item()), "growth_tracker": int(self._growth_tracker.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["growth_tracker"]))
