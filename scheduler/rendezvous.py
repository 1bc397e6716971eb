"""The key-value store of torch.distributed's own rendezvous, served on the master's gRPC channel.

gloo and NCCL exchange their peers' addresses through a ``Store``. A ``TCPStore`` would be a second
port with no access control, so the master serves the store itself (``Store`` RPC): only workers
holding a session key (admitted with the job's token) reach it, and no value in it decides anything
about membership (arrivals and "the master moved on" travel on ``EpochStatus``). Each membership
epoch writes under ``vnodes.protos.epoch_store_prefix(epoch)``; the master drops an epoch's keys once
it is superseded, and the table is bounded.

Every method but ``forget_epochs_before`` runs on the server's event loop (one thread, no lock).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional

from vnodes.protos import EPOCH_STORE_PREFIX

from .errors import BadRequest, StoreFull

MAX_KEYS = 65536
MAX_BYTES = 64 * 2**20


class RendezvousStore:
    def __init__(self, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES):
        self.max_keys, self.max_bytes = max_keys, max_bytes
        self._data: dict[str, bytes] = {}
        self._bytes = 0
        self._changed: Optional[asyncio.Event] = None  # replaced at every change: waiters re-check
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pending_forget = -1  # forget_epochs_before from another thread before the loop is known
        self._lock = threading.Lock()  # guards _loop and _pending_forget only

    # -- operations (event loop) -----------------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        """Raises ``StoreFull`` past the key or byte limit."""
        self._bind()
        old = self._data.get(key)
        grow = len(key) + len(value) - (0 if old is None else len(key) + len(old))
        if old is None and len(self._data) >= self.max_keys:
            raise StoreFull(f"{len(self._data)} keys")
        if self._bytes + grow > self.max_bytes:
            raise StoreFull(f"{self._bytes} bytes")
        self._data[key] = bytes(value)
        self._bytes += grow
        self._notify()

    async def get(self, key: str, timeout_s: float) -> Optional[bytes]:
        """The value of ``key``, waiting up to ``timeout_s`` for it to be set (None: not yet)."""
        if await self.wait([key], timeout_s):
            return self._data[key]
        return None

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the decimal integer at ``key`` (0 if absent); the new value."""
        self._bind()
        try:
            value = int(self._data.get(key, b"0")) + amount
        except ValueError:
            value = amount  # not a number: torch's stores would fail; start over rather than wedge
        if not -2**63 <= value < 2**63:
            raise BadRequest(f"store key {key!r} would hold {value}, past a 64-bit integer")
        self.set(key, str(value).encode())
        return value

    def check(self, keys: list[str]) -> bool:
        return all(k in self._data for k in keys)

    async def wait(self, keys: list[str], timeout_s: float) -> bool:
        """Whether every key exists, waiting up to ``timeout_s`` for them."""
        self._bind()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.check(keys):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = self._event()
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return self.check(keys)
        return True

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (absent counts as empty ``expected``);
        returns the value it holds afterwards, as torch's stores do."""
        current = self._data.get(key)
        if (current is None and not expected) or current == expected:
            self.set(key, desired)
            return desired
        return expected if current is None else current

    def delete(self, key: str) -> bool:
        old = self._data.pop(key, None)
        if old is None:
            return False
        self._bytes -= len(key) + len(old)
        self._notify()
        return True

    def num_keys(self) -> int:
        return len(self._data)

    # -- housekeeping ----------------------------------------------------------------------------

    def forget_epochs_before(self, membership_epoch: int) -> None:
        """Drop the keys of every epoch older than ``membership_epoch`` (may be called from any thread)."""
        with self._lock:
            loop = self._loop
            if loop is None:
                self._pending_forget = max(self._pending_forget, membership_epoch)
                return
        loop.call_soon_threadsafe(self._forget, membership_epoch)

    def _forget(self, membership_epoch: int) -> None:
        for key in [k for k in self._data if _before(k, membership_epoch)]:
            self.delete(key)

    def _bind(self) -> None:
        if self._loop is not None:
            return
        with self._lock:
            self._loop = asyncio.get_running_loop()
            pending, self._pending_forget = self._pending_forget, -1
        if pending >= 0:
            self._forget(pending)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def _before(key: str, membership_epoch: int) -> bool:
    epoch = epoch_of_store_key(key)
    return epoch is not None and epoch < membership_epoch


def epoch_of_store_key(key: str) -> Optional[int]:
    """The membership epoch a key belongs to, or None for a key outside every epoch."""
    if not key.startswith(EPOCH_STORE_PREFIX):
        return None
    number, _, _ = key[len(EPOCH_STORE_PREFIX):].partition("/")
    return int(number) if number.isdigit() else None
