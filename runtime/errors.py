"""Errors raised beside a device.

Fatal errors a user acts on (``InvalidJobSpec``, ``CheckpointMismatch``, ``NonFiniteLoss``,
``StaleEpoch``). Recoverable events (a lost peer: the step is redone; a membership change: the group
is re-formed) are not exceptions that reach the user: the worker agent handles them in its loop
(``runtime/agent.py``), and a lost master is ``master_client.MasterUnavailable`` (retried).

Every exception pickles (its constructor arguments are kept in ``args``) so it can cross a process
boundary unchanged.
"""

from __future__ import annotations


class VnodesError(Exception):
    """Base class of every error this package raises on purpose."""


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
