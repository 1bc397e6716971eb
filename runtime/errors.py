"""Errors raised beside a device.

Fatal errors a user acts on (``InvalidJobSpec``, ``CheckpointMismatch``, ``NonFiniteLoss``,
``StaleEpoch``, ``StorageError``). Recoverable events (a lost peer: the step is redone; a membership
change: the group is re-formed) are not exceptions that reach the user: the worker agent handles them
in its loop (``runtime/agent.py``), and a lost master is ``master_client.MasterUnavailable`` (retried),
until the worker gives up on it: ``MasterLost`` (the worker exits, code 4).

Every exception pickles (its constructor arguments are kept in ``args``) so it can cross a process
boundary unchanged. An error crossing the network does not: the master never unpickles what it
receives, so a worker's fatal error reaches the caller of ``train`` as ``JobFailed``, with the
worker's error type, message and traceback as text.
"""

from __future__ import annotations

import os


class VnodesError(Exception):
    """Base class of every error this package raises on purpose."""


class PeerLost(VnodesError, RuntimeError):
    """Retryable: a collective, a rendezvous or a group's connection could not complete because a
    member of the epoch vanished, a connection dropped, or the master moved on. The step is aborted
    and redone by the epoch that forms next (at most ``VNODES_MAX_STEP_ATTEMPTS`` times in a row).

    Raised only where torch.distributed's errors arise (``collectives.py``); any other error inside
    a step's reduction is a bug, and fails the job at once with its name."""


class InvalidJobSpec(VnodesError, ValueError):
    """A ``JobSpec`` field (or an argument of ``train``) is unusable.

    ``field`` names the setting to change; the message says why and how.
    """

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class CheckpointMismatch(VnodesError):
    """A checkpoint was written by a job whose trajectory differs from the one asked for now."""

    def __init__(self, fields: list[str], directory: str):
        super().__init__(fields, directory)
        self.fields = list(fields)
        self.directory = directory

    def __str__(self) -> str:
        if self.fields == ["seeding"]:
            return (f"the checkpoint in {self.directory} was written by a vnodes version that derives per-node "
                    "random streams differently; resuming would change the trajectory. Resume with that "
                    "version, or pass a fresh checkpoint_dir to start a new run.")
        names = ", ".join(self.fields)
        return (
            f"the checkpoint in {self.directory} was written by a job that differs in {names}; "
            f"resuming would change the trajectory. Restore the original value of {names}, "
            "or pass a fresh checkpoint_dir to start a new run."
        )


class NonFiniteLoss(VnodesError, FloatingPointError):
    """A virtual node produced a NaN or infinite loss; the step was not applied."""

    def __init__(self, step: int, vnode_id: int, value: float):
        super().__init__(step, vnode_id, value)
        self.step = step
        self.vnode_id = vnode_id
        self.value = value

    def __str__(self) -> str:
        return (
            f"loss is {self.value} at step {self.step} on virtual node {self.vnode_id}; the step was "
            "not applied and the last checkpoint is intact. Lower the learning rate, check the data "
            "of that virtual node (vnodes.runtime.VNodeSampler gives its indices), or clip gradients."
        )


class StaleEpoch(VnodesError):
    """A message carried a membership epoch older than the current one."""

    def __init__(self, got: int, current: int):
        super().__init__(got, current)
        self.got = got
        self.current = current

    def __str__(self) -> str:
        return f"membership epoch {self.got} is stale (current is {self.current}); re-register"


class MasterLost(VnodesError):
    """Fatal for this worker (not for the job): its master went away mid-job and no master answered at
    its address within ``waited_s`` (``--master-timeout``). The worker exits with code 4.

    ``held_step`` is the step whose state the worker held; ``detail`` what the last attempt saw.
    """

    def __init__(self, address: str, waited_s: float, held_step: int, detail: str):
        super().__init__(address, waited_s, held_step, detail)
        self.address, self.waited_s, self.held_step, self.detail = address, waited_s, held_step, detail

    def __str__(self) -> str:
        return (f"lost the master at {self.address}: {self.detail}. This worker held the state of step "
                f"{self.held_step} and gave up after --master-timeout {self.waited_s:g} s (exit code 4). Restart "
                "the master on its run directory (it resumes from its last checkpoint) and start workers again, "
                "or give workers a longer --master-timeout")


class StorageError(VnodesError):
    """A file of the job (a checkpoint, the master's state) could not be written: the directory is
    read-only, full, or gone. Fatal: the job stops cleanly and can be resumed once it is fixed.

    ``what`` names the file (e.g. ``"checkpoint step-00000004.pt"``); ``reason`` is the OS error.
    """

    def __init__(self, what: str, directory: str, reason: str):
        super().__init__(what, directory, reason)
        self.what = what
        self.directory = directory
        self.reason = reason

    @classmethod
    def from_os_error(cls, what: str, directory: str | os.PathLike, exc: OSError) -> "StorageError":
        """``reason`` is the error without its (often temporary) file name: ``[Errno 28] No space left on device``."""
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None and exc.strerror else str(exc)
        return cls(what, str(directory), reason)

    def __str__(self) -> str:
        return (f"cannot write {self.what} in {self.directory}: {self.reason}; make {self.directory} writable "
                "(or free space on its disk) and run the same command again to resume from the last checkpoint")


class JobFailed(VnodesError):
    """A worker ended the job with a fatal error (or the master did: ``worker_id`` is then empty).

    ``error_type`` is the class name of the worker's exception (e.g. ``"NonFiniteLoss"``),
    ``traceback`` its formatted traceback on the worker.
    """

    def __init__(self, message: str, error_type: str = "", traceback: str = "", worker_id: str = ""):
        super().__init__(message, error_type, traceback, worker_id)
        self.message, self.error_type, self.traceback, self.worker_id = message, error_type, traceback, worker_id

    def __str__(self) -> str:
        where = f" on worker {self.worker_id}" if self.worker_id else ""
        return f"the job failed{where}: {self.error_type + ': ' if self.error_type else ''}{self.message}"


class JobCodeError(VnodesError):
    """One of the job's own functions (a builder, the dataset) raised; the original is ``__cause__``.

    ``role`` says which (e.g. ``"model builder"``), ``where`` the innermost frame (``file:line``).
    """

    def __init__(self, role: str, function_name: str, error_type: str, message: str, where: str = ""):
        super().__init__(role, function_name, error_type, message, where)
        self.role, self.function_name, self.error_type, self.message, self.where = (
            role, function_name, error_type, message, where)

    @classmethod
    def wrap(cls, role: str, function, exc: BaseException) -> "JobCodeError":
        import traceback

        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        name = getattr(function, "__qualname__", None) or type(function).__name__
        return cls(role, name, type(exc).__name__, str(exc), where)

    def __str__(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return (f"the job's {self.role} {self.function_name} raised {self.error_type}: {self.message}{at}; "
                "fix it there (run with -v for the whole traceback)")


class CodePackageError(VnodesError):
    """The job's code package a worker received is not what the master announced (its digest or size
    differ), holds a path outside its folder, or cannot be stored in the worker's code cache. Nothing
    of it is imported. The message names the bad value and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class JobCodeMissing(VnodesError):
    """The job refers to code this worker cannot import: a module (``name`` empty), or a name in one.

    ``detail`` is the import error's own text; ``code_dir`` where this worker unpacked the job's
    folder ("" when the master shipped none).
    """

    def __init__(self, module: str, name: str = "", detail: str = "", code_dir: str = ""):
        super().__init__(module, name, detail, code_dir)
        self.module, self.name, self.detail, self.code_dir = module, name, detail, code_dir

    def __str__(self) -> str:
        import sys

        shipped = "the job's folder (the job file's, or the launching script's), which the master ships to every worker"
        if self.code_dir:
            shipped += f" (unpacked here in {self.code_dir})"
        if self.name:
            return (f"the job needs {self.module}.{self.name}, but the module {self.module!r} this worker imports "
                    f"does not define it ({self.detail}); give the worker the same version of {self.module!r} as "
                    f"the master: update it in this worker's Python environment ({sys.executable}), or keep it "
                    f"in {shipped}")
        return (f"the job needs the module {self.module!r}, which this worker cannot import ({self.detail}); "
                f"install it in this worker's Python environment ({sys.executable}), or put it in {shipped}")
