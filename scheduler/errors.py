"""Errors of the master side. Each maps to exactly one gRPC status code (see ``servicer.py``)."""

from __future__ import annotations

from vnodes.runtime.errors import StaleEpoch, VnodesError

__all__ = ["MasterError", "UnknownWorker", "DuplicateRegistration", "BadRequest", "StaleEpoch", "Undecided",
           "NotYourRegistration", "TooManyWorkers", "StoreFull", "InsecureListen",
           "CodeTooLarge", "DevicesUnavailable"]


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


class InsecureListen(MasterError, ValueError):
    """A master asked to listen beyond loopback without a token."""

    def __init__(self, host: str):
        super().__init__(host)
        self.host = host

    def __str__(self) -> str:
        return (f"listening on {self.host} needs a shared token that workers present (--token or VNODES_TOKEN); "
                "without one, listen on 127.0.0.1")


class DevicesUnavailable(VnodesError, ValueError):
    """The local launcher cannot give each worker a device (``devices.assign_devices``). Raised before
    any worker starts: not a gRPC error. The message names the workers, the devices and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CodeTooLarge(VnodesError):
    """The job's folder holds more than the master ships to its workers (``code_package.py``).

    Raised while packing, before the master serves: not a gRPC error. ``size_bytes`` is what was
    counted when packing stopped (at least that much); ``biggest`` the largest files seen, as
    ``(path relative to the folder, bytes)``.
    """

    def __init__(self, folder: str, size_bytes: int, cap_bytes: int, biggest: list[tuple[str, int]], env_var: str):
        super().__init__(folder, size_bytes, cap_bytes, biggest, env_var)
        self.folder, self.size_bytes, self.cap_bytes = folder, size_bytes, cap_bytes
        self.biggest, self.env_var = list(biggest), env_var

    def __str__(self) -> str:
        def size(n: int) -> str:
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if n >= scale:
                    return f"{n / scale:.1f} {unit}"
            return f"{n} bytes"

        files = ", ".join(f"{path} ({size(n)})" for path, n in self.biggest)
        return (f"the job's folder {self.folder} holds more than the {size(self.cap_bytes)} of files the master "
                f"ships to its workers (at least {size(self.size_bytes)}; the biggest: {files}). Move data and "
                f"outputs out of {self.folder}, or list them in its .vnodesignore, or raise the cap: "
                f"{self.env_var}=<bytes> (now {self.cap_bytes})")


class CannotListen(MasterError, OSError):
    """The master's address cannot be bound (the port is taken, or the host is not this machine's)."""

    def __init__(self, address: str, detail: str):
        super().__init__(address, detail)
        self.address, self.detail = address, detail

    def __str__(self) -> str:
        return (f"cannot listen on {self.address} ({self.detail}); another process may hold the port: pick "
                "another --port (0 picks a free one), or a --host of this machine")


class WorkersGone(MasterError):
    """A launcher's workers all ended (or kept failing) before the job finished."""
