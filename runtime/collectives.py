"""The gradient path: a torch.distributed process group per membership epoch.

What crosses which channel:

- **Membership** (the master's gRPC channel, ``EpochStatus``): a worker arrives at epoch ``e``'s
  rendezvous and learns whether the master has moved on from ``e``. The master alone decides both;
  nothing a worker (or anyone else) writes into the store can count as an arrival or abort an epoch.
- **torch.distributed's own rendezvous** (the master's gRPC channel, ``Store``, via
  ``master_store.MasterStore``): gloo's and NCCL's address exchange, under the key prefix
  ``vnodes.protos.epoch_store_prefix(e)``, so a stale member of an old epoch never joins a new one.
  Only admitted workers reach it (a per-registration session key, behind the job's token and TLS);
  the master listens on no other port and drops old epochs' keys as it moves on (bounded).
- **Gradients and state broadcasts** (gloo on CPU, NCCL on GPU), never over gRPC.

What remains exposed, as in torch itself: the peer-to-peer TCP connections gloo and NCCL open
between workers (addresses learned through the store) carry no authentication or encryption, so
workers must share a network you trust.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import threading
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from vnodes.protos import epoch_store_prefix

from .engine import StepPartial
from .errors import PeerLost
from .master_client import MasterUnavailable
from .master_store import MasterStore
from .reduction import Block, Payload, canonical_sum


class EpochSuperseded(PeerLost):
    """The master formed a newer epoch while this one was still gathering its members."""


class SoloGroup:
    """The group of an epoch whose only member is this worker (``train(workers=1)``, in process):
    nothing crosses a process boundary, and the reduction is the canonical sum of this worker's
    own blocks, the same bits as any number of workers computes."""

    holds_abandoned = False

    def __init__(self) -> None:
        self.epoch: Optional[int] = None

    def form(self, epoch: int, rank: int, world_size: int) -> None:
        if world_size != 1:
            raise ValueError(f"an in-process worker cannot join an epoch of {world_size} members")
        self.epoch = epoch

    def reduce(self, partial: StepPartial, deterministic: bool) -> tuple[Payload, list[bool]]:
        return (canonical_sum(partial.blocks) if deterministic else partial.payload), partial.used

    def broadcast_state(self, state: Optional[dict[str, Any]], source_rank: int) -> dict[str, Any]:
        return state

    def destroy(self) -> None:
        self.epoch = None

    def adopt_abandoned(self, older: Any) -> None:
        pass


@contextlib.contextmanager
def _peers():
    """The boundary where torch.distributed's errors arise: each one is a ``PeerLost`` (retryable).
    torch raises ``RuntimeError`` (``DistError`` and its kinds derive from it) for a closed connection,
    a timeout or a peer's abort alike; none of them is this worker's bug."""
    try:
        yield
    except PeerLost:
        raise
    except RuntimeError as exc:
        raise PeerLost(str(exc)) from exc


def local_address_towards(address: str) -> Optional[str]:
    """This machine's address on the route to ``address`` (``HOST:PORT``, the master): the interface
    a worker's peers can reach it on, on a multi-homed host or one whose hostname resolves to a
    loopback address (Debian's 127.0.1.1). None if it cannot be told (no route, a bad address)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)  # UDP: picks the route, sends nothing
            return probe.getsockname()[0]
    except OSError:
        return None


def gloo_group(store, rank: int, world_size: int, timeout: datetime.timedelta, bind_address: Optional[str]):
    """A gloo group whose transport listens on ``bind_address``. gloo's own default is the address
    the hostname resolves to, which on many machines is a loopback one that peers on other hosts
    cannot reach. ``GLOO_SOCKET_IFNAME``, when set, is the user's choice and is kept."""
    if bind_address is None or os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_address)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


class EpochGroup:
    """This worker's membership in the current epoch's process group.

    ``client`` is the worker's registered ``MasterClient`` (anything with its ``store`` and
    ``epoch_status`` methods). On the CPU each epoch gets a process-group object of its own
    (``ProcessGroupGloo``), not the global default group, and every collective is waited for in short
    polls that also ask the master whether it moved on from the epoch. So when a peer is *stopped*
    rather than dead (SIGSTOP, a frozen VM: its sockets stay open, its collective never completes),
    the survivors leave the collective as soon as the master has declared it lost and moved on,
    instead of after the group timeout; the abandoned group is kept until its pending collective
    expires on its own (destroying it earlier would block until then). A master that cannot be
    reached meanwhile (restarting) does not end a collective: it may still complete, and otherwise
    times out. On GPUs (NCCL) the epoch's group is the default group, as before.
    """

    POLL = datetime.timedelta(seconds=0.25)
    ARRIVAL_POLL_S = (0.002, 0.02)  # first and longest pause between arrival polls (doubling)

    def __init__(self, client, device: torch.device, timeout_s: float = 60.0):
        self.client = client
        self.store = MasterStore(client, timeout_s)
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.bind_address = local_address_towards(getattr(client, "address", ""))
        self.epoch: Optional[int] = None
        self.rank = -1
        self.world_size = 0
        self.pg: Optional[Any] = None
        self._pending: Optional[Any] = None  # the newest collective's work, until it completes
        self._abandoned: list[tuple[Any, Any]] = []  # (group, work) left to expire on their own
        self._connecting: list[threading.Thread] = []  # connect attempts left to time out on their own
        self._retired_stores: list[MasterStore] = []  # replaced objects' stores that those may still call

    def form(self, epoch: int, rank: int, world_size: int) -> None:
        """Leave the previous epoch's group and join epoch ``epoch``'s.

        Raises:
            EpochSuperseded: the master moved on before every member arrived and connected.
            PeerLost: a peer did not arrive or connect within the timeout.
            MasterUnavailable: the master cannot be reached while the members arrive.
        """
        self.destroy()
        # Gather every member first, as the master counts them: a member that died before arriving
        # must not hold the survivors for the whole timeout. Every poll arrives again (idempotent).
        deadline = time.monotonic() + self.timeout.total_seconds()
        pause_s, longest_s = self.ARRIVAL_POLL_S
        while True:
            superseded, arrived = self.client.epoch_status(epoch, arrive=True)
            if superseded:
                raise EpochSuperseded(f"epoch {epoch} was superseded before all {world_size} members arrived")
            if arrived >= world_size:
                break
            if time.monotonic() > deadline:
                raise PeerLost(f"epoch {epoch}: {world_size - arrived} of {world_size} members missing "
                               f"after {self.timeout.total_seconds():.0f} s")
            time.sleep(pause_s)
            pause_s = min(2 * pause_s, longest_s)
        store = dist.PrefixStore(epoch_store_prefix(epoch), self.store)
        if self.backend == "gloo":
            self.pg = self._connect_gloo(store, epoch, rank, world_size)
        else:
            with _peers("connecting"):
                dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size,
                                        timeout=self.timeout)
            self.pg = dist.group.WORLD
        self.epoch, self.rank, self.world_size = epoch, rank, world_size

    def _superseded(self, epoch: int) -> bool:
        """Whether the master moved on from ``epoch``; a master out of reach has not (yet): it
        may be restarting, and a collective that can complete should."""
        try:
            return self.client.epoch_status(epoch)[0]
        except MasterUnavailable:
            return False

    def _connect_gloo(self, store, epoch: int, rank: int, world_size: int):
        """Build epoch ``epoch``'s gloo group on ``store`` in a helper thread while asking the master
        whether it moved on: a member that arrived and then vanished before connecting must not hold
        the survivors for the whole group timeout. An abandoned attempt ends by itself at the timeout.

        Raises:
            EpochSuperseded: the master moved on while the members were connecting.
        """
        built: dict[str, Any] = {}

        def connect() -> None:
            try:
                built["pg"] = gloo_group(store, rank, world_size, self.timeout, self.bind_address)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                built["error"] = exc

        thread = threading.Thread(target=connect, name=f"vnodes-connect-epoch-{epoch}", daemon=True)
        thread.start()
        while True:
            thread.join(self.POLL.total_seconds())
            if not thread.is_alive():
                break
            if self._superseded(epoch):
                self._connecting.append(thread)  # inside the C++ constructor until its timeout
                raise EpochSuperseded(f"epoch {epoch} was superseded while its members connected")
        if "error" in built:
            error = built["error"]
            raise error if isinstance(error, PeerLost) else PeerLost(f"connecting epoch {epoch}: {error}") from error
        return built["pg"]

    def destroy(self) -> None:
        self._abandoned = [(pg, work) for pg, work in self._abandoned if not work.is_completed()]
        if self.backend == "gloo":
            if self._pending is not None and not self._pending.is_completed():
                self._abandoned.append((self.pg, self._pending))  # dropping it now would block
        elif dist.is_initialized():
            dist.destroy_process_group()
        self.pg, self._pending = None, None
        self.epoch = None

    def adopt_abandoned(self, older: "EpochGroup") -> None:
        """Keep ``older``'s abandoned groups alive in this object (a reconnect replaces the object)."""
        older.destroy()
        self._abandoned.extend(older._abandoned)
        self._connecting.extend(older._connecting)
        if older._abandoned or older._connecting:  # their stores' Python halves must outlive them too
            self._retired_stores.append(older.store)
        self._retired_stores.extend(older._retired_stores)
        older._abandoned, older._connecting, older._retired_stores = [], [], []

    @property
    def holds_abandoned(self) -> bool:
        """Groups left with a pending collective (dropping them blocks until it times out), or
        connect attempts still inside gloo's constructor: a process that holds any should end
        with ``os._exit`` rather than run its finalizers."""
        self._connecting = [t for t in self._connecting if t.is_alive()]
        return bool(self._connecting) or any(not work.is_completed() for _, work in self._abandoned)

    def _run(self, start) -> None:
        """Start a collective (``start()`` returns its work) and wait for it.

        Raises:
            PeerLost: it failed, timed out or was superseded (``_wait``).
        """
        with _peers():
            work = start()
        self._wait(work)

    def _wait(self, work) -> None:
        """Wait for ``work``; on gloo in short polls, leaving at once if the epoch was superseded.

        Raises:
            EpochSuperseded: the master moved on while the collective was pending (a peer stopped).
            PeerLost: the collective failed (a peer vanished) or timed out.
        """
        if self.backend != "gloo":
            with _peers():
                work.wait()
            return
        self._pending = work
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            try:
                work.wait(self.POLL)
                self._pending = None
                return
            except RuntimeError:
                if work.is_completed():
                    # Failed (a peer's connection closed), or finished just after the poll gave up:
                    # a plain wait now returns at once, or raises the collective's own error.
                    self._pending = None
                    with _peers():
                        work.wait()
                    return
            if self._superseded(self.epoch):
                raise EpochSuperseded(f"epoch {self.epoch} was superseded during a collective")
            if time.monotonic() > deadline:
                    raise PeerLost(f"epoch {self.epoch}: collective not done after "
                               f"{self.timeout.total_seconds():.0f} s")

    def broadcast_state(self, state: Optional[dict[str, Any]], source_rank: int) -> dict[str, Any]:
        """Send ``state`` from ``source_rank`` to every member; returns it everywhere."""
        data = _serialize(state) if self.rank == source_rank else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._object_device())
        self._run(lambda: self.pg.broadcast(size, source_rank))
        if self.rank == source_rank:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._object_device())
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=self._object_device())
        self._run(lambda: self.pg.broadcast(buffer, source_rank))
        return state if self.rank == source_rank else _deserialize(buffer)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every member's ``obj``, in rank order."""
        data = _serialize(obj)
        device = self._object_device()
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
        self._run(lambda: self.pg.allgather([sizes], [size]))
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8, device=device)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        self._run(lambda: self.pg.allgather([gathered], [mine]))
        return [_deserialize(g[:int(s.item())]) for g, s in zip(gathered, sizes)]

    def reduce(self, partial: StepPartial, deterministic: bool) -> tuple[Payload, list[bool]]:
        """Sum every member's partial: one all-reduce per dtype (fast), or canonical (deterministic).

        Raises:
            PeerLost: a peer vanished (the caller reports the step as not reduced).
            EpochSuperseded: the master moved on while waiting for a peer (it stopped).
        """
        if deterministic:
            return self._reduce_canonical(partial)
        payload = list(partial.payload)
        used = torch.tensor([float(u) for u in partial.used], device=self.device)
        for indices in _by_dtype(payload).values():
            flat = _flatten_dense_tensors([payload[i] for i in indices])
            self._run(lambda: self.pg.allreduce([flat]))
            for i, t in zip(indices, _unflatten_dense_tensors(flat, [payload[i] for i in indices])):
                payload[i].copy_(t)
        self._run(lambda: self.pg.allreduce([used]))
        return payload, [bool(u > 0) for u in used.tolist()]

    def _reduce_canonical(self, partial: StepPartial) -> tuple[Payload, list[bool]]:
        """The canonical sum by reduce-scatter: member ``r`` sums slice ``r`` of every member's blocks
        in the canonical tree order, then the members gather the summed slices.

        Addition is elementwise, so summing slices gives the bits of summing whole tensors, while
        each member sends its blocks once (not to every peer) and adds only its ``1/W`` share.
        """
        if self.world_size == 1:  # sums the partial's own blocks in place (a redo recomputes them)
            return canonical_sum(partial.blocks), list(partial.used)
        mine = [(b.start, b.size) for b in partial.blocks]
        gathered = self.all_gather_objects((mine, partial.used))  # small: block ids and usage flags
        spans = [span for spans, _ in gathered for span in spans]
        counts = [len(spans) for spans, _ in gathered]
        used = [any(flags) for flags in zip(*(u for _, u in gathered))]
        template = partial.blocks[0].payload
        total: list[Optional[torch.Tensor]] = [None] * len(template)
        for indices in _by_dtype(template).values():
            for i, t in zip(indices, self._reduce_scatter_gather(partial.blocks, indices, spans, counts)):
                total[i] = t
        return total, used

    def _reduce_scatter_gather(self, blocks: list[Block], indices: list[int], spans: list[tuple[int, int]],
                               counts: list[int]) -> list[torch.Tensor]:
        """The canonical sum of the payload tensors ``indices`` (one dtype) over every member's blocks."""
        w, device = self.world_size, self.device
        shapes = [blocks[0].payload[i] for i in indices]
        length = sum(t.numel() for t in shapes)
        chunk = -(-length // w)  # member r owns elements [r * chunk, (r + 1) * chunk) of the padded vector
        # Grouped by destination: send[r, j] is block j's slice for member r. Each block passes
        # through one reusable padded vector, so the peak is the blocks plus one copy of them.
        send = torch.empty(w, len(blocks), chunk, dtype=shapes[0].dtype, device=device)
        padded = torch.zeros(w * chunk, dtype=send.dtype, device=device)
        for j, block in enumerate(blocks):
            offset = 0
            for i in indices:
                t = block.payload[i]
                padded[offset:offset + t.numel()].copy_(t.reshape(-1))
                offset += t.numel()
            send[:, j].copy_(padded.view(w, chunk))
        del padded
        received = torch.empty(sum(counts) * chunk, dtype=send.dtype, device=device)
        self._run(lambda: self.pg.alltoall_base(received, send.view(-1), [c * chunk for c in counts],
                                         [len(blocks) * chunk] * w, dist.AllToAllOptions()))
        slices = received.view(-1, chunk)
        mine = canonical_sum([Block(start, size, [slices[k]]) for k, (start, size) in enumerate(spans)])[0]
        summed = torch.empty(w * chunk, dtype=send.dtype, device=device)
        self._run(lambda: self.pg.allgather([list(summed.view(w, chunk))], [mine]))
        return list(_unflatten_dense_tensors(summed[:length], shapes))

    def _object_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _by_dtype(tensors: Payload) -> dict[torch.dtype, list[int]]:
    """Positions of ``tensors`` grouped by dtype (one flat buffer per dtype on the wire)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _deserialize(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=False)
