"""vnodes.runtime: what runs beside a device.

    from vnodes.runtime import JobSpec, train, load_checkpoint
"""

from .checkpoint import Checkpoint, load_checkpoint
from .engine import StepEngine
from .errors import (CheckpointMismatch, InvalidJobSpec, JobFailed, NonFiniteLoss, PeerLost, StaleEpoch,
                     StorageError, VnodesError)
from .events import Callback, Event, RunState
from .sampler import VNodeSampler
from .seeding import vnode_seed
from .spec import JobSpec
from .train import TrainResult, train

__all__ = [
    "Callback", "Checkpoint", "CheckpointMismatch", "Event", "InvalidJobSpec", "JobFailed", "JobSpec",
    "NonFiniteLoss", "PeerLost", "RunState", "StaleEpoch", "StepEngine", "StorageError", "TrainResult",
    "VNodeSampler", "VnodesError", "load_checkpoint", "train", "vnode_seed",
]
