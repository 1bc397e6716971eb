"""Errors of the master side. Each maps to exactly one gRPC status code (see ``servicer.py``)."""

from __future__ import annotations

from vnodes.runtime.errors import StaleEpoch, VnodesError

__all__ = ["MasterError", "UnknownWorker", "DuplicateRegistration", "BadRequest", "StaleEpoch", "Undecided"]


class MasterError(VnodesError):
    """Base of the errors the master returns to a caller."""


class UnknownWorker(MasterError):
    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.worker_id = worker_id

    def __str__(self) -> str:
        return f"unknown worker id {self.worker_id!r}; register first (or again after a master restart)"


class DuplicateRegistration(MasterError):
    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.worker_id = worker_id

    def __str__(self) -> str:
        return f"worker id {self.worker_id!r} is already registered and alive"


class BadRequest(MasterError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Undecided(MasterError):
    """A commit waited too long for its step to be decided (a peer neither committed nor died)."""
