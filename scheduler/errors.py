"""Errors of the master side. Each maps to exactly one gRPC status code (see ``servicer.py``)."""

from __future__ import annotations

from vnodes.runtime.errors import StaleEpoch, VnodesError

__all__ = ["MasterError", "UnknownWorker", "DuplicateRegistration", "BadRequest", "StaleEpoch", "Undecided",
           "NotYourRegistration", "TooManyWorkers", "StoreFull"]


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


class NotYourRegistration(MasterError):
    """A request named a worker but did not carry the secret of its current registration."""

    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.worker_id = worker_id

    def __str__(self) -> str:
        return (f"this request does not carry the session key of worker {self.worker_id!r}'s current registration: "
                "a worker acts only for itself (RegisterReply.session_key); register to get a key of your own")


class TooManyWorkers(MasterError):
    """The master's table of live registrations is full."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return (f"the master already has {self.limit} live registrations, its limit; stop some workers "
                "(registrations that died or left are forgotten)")


class StoreFull(MasterError):
    """The rendezvous store holds as many keys or bytes as it may."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what

    def __str__(self) -> str:
        return (f"the rendezvous store is full ({self.what}); keys of superseded membership epochs are dropped "
                "as the job moves on, so this means a worker writes keys it should not")
