"""torch.distributed's ``Store``, served by the master on its own authenticated gRPC channel.

gloo and NCCL exchange their peers' addresses through a key-value store. ``MasterStore`` forwards
every operation to the master's ``Store`` RPC (``MasterClient.store``), so only a worker the master
admitted (its per-registration session key, behind the job's token and TLS) can read or write it,
and the master listens on no port but its gRPC one. Nothing in the store decides membership:
arrivals and "the master moved on from this epoch" come from ``EpochStatus`` (see
``collectives.py``).
"""

from __future__ import annotations

import datetime
import time
from typing import Optional, Sequence, Union

import torch.distributed as dist

POLL_S = 10.0  # one GET/WAIT long poll; the master answers within its own cap (10 s) anyway

Value = Union[bytes, str, Sequence[int]]


class MasterStore(dist.Store):
    """A ``torch.distributed.Store`` whose every operation is one ``client.store(...)`` call.

    ``client`` is a registered ``MasterClient`` (or anything with its ``store`` method). Safe to use
    from several threads at once: each operation is one RPC on gRPC's thread-safe channel, and no
    state lives here. GET and WAIT are long polls the master answers within a few seconds; this
    store asks again until its own timeout (``timeout_s``, or the one a caller passes to ``wait``;
    zero means none, as in torch), then raises ``torch.distributed.DistStoreError`` as torch's own
    stores do. ``list_keys`` and the queue operations are not served (torch's default: not
    implemented); gloo and NCCL use neither.

    Keep a reference to this object for as long as torch may call it: a ``PrefixStore`` or process
    group holds only its C++ half, and once the Python object is collected every call through them
    fails ("Not implemented").

    Raises (every operation):
        MasterUnavailable: the master cannot be reached.
        MasterRefused: the master refused this worker's session key or token.
    """

    def __init__(self, client, timeout_s: float = 300.0):
        super().__init__()
        self._client = client
        self.set_timeout(datetime.timedelta(seconds=timeout_s))

    def set(self, key: str, value: Value) -> None:
        self._client.store("SET", [key], value=_bytes(value))

    def get(self, key: str) -> bytes:
        """The value of ``key``, waiting for it to be set up to the store's timeout.

        Raises:
            DistStoreError: ``key`` was not set within the timeout.
        """
        deadline = _deadline(self.timeout)
        while True:
            result = self._client.store("GET", [key], timeout_s=_poll_s(deadline))
            if result.ready:
                return result.value
            if result.superseded:
                raise dist.DistStoreError(f"membership epoch of /{key} is superseded: its keys are gone")
            if _expired(deadline):
                raise dist.DistStoreError(f"wait timeout after {_ms(self.timeout)}ms, keys: /{key}")

    def add(self, key: str, amount: int) -> int:
        return self._client.store("ADD", [key], amount=int(amount)).number

    def check(self, keys: Sequence[str]) -> bool:
        return self._client.store("CHECK", list(keys)).ready

    def wait(self, keys: Sequence[str], timeout: Optional[datetime.timedelta] = None) -> None:
        """Return once every key in ``keys`` is set.

        Raises:
            DistStoreError: some key was not set within ``timeout`` (default: the store's).
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = _deadline(timeout)
        keys = list(keys)
        while True:
            result = self._client.store("WAIT", keys, timeout_s=_poll_s(deadline))
            if result.ready:
                return
            if result.superseded:
                raise dist.DistStoreError(f"membership epoch of /{keys[0]} is superseded: its keys are gone")
            if _expired(deadline):
                raise dist.DistStoreError(f"wait timeout after {_ms(timeout)}ms, keys: "
                                          + ", ".join("/" + k for k in keys))

    def compare_set(self, key: str, expected: Value, desired: Value) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (absent counts as an empty
        ``expected``); the value it holds afterwards."""
        return self._client.store("COMPARE_SET", [key], value=_bytes(desired), expected=_bytes(expected)).value

    def delete_key(self, key: str) -> bool:
        return bool(self._client.store("DELETE", [key]).number)

    def num_keys(self) -> int:
        return self._client.store("NUM_KEYS", []).number

    def clone(self) -> "MasterStore":
        """Another handle on the same store (torch asks for one for a thread of its own)."""
        return MasterStore(self._client, self.timeout.total_seconds())

    # The C++ side of torch's Python-store trampoline looks these two up by their C++ names.
    deleteKey = delete_key
    getNumKeys = num_keys


def _bytes(value: Value) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _deadline(timeout: datetime.timedelta) -> Optional[float]:
    """When a wait of ``timeout`` ends (None: never; torch's stores read zero as no timeout)."""
    seconds = timeout.total_seconds()
    return None if seconds <= 0 else time.monotonic() + seconds


def _poll_s(deadline: Optional[float]) -> float:
    if deadline is None:
        return POLL_S
    return max(0.0, min(POLL_S, deadline - time.monotonic()))


def _expired(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _ms(timeout: datetime.timedelta) -> int:
    return int(timeout.total_seconds() * 1000)
