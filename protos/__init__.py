"""vnodes.protos: the wire contract between workers and the master.

The generated messages (``vnodes_pb2``) and the constants both sides share: the token's metadata
key, the store's key scheme, the state-sync sentinels, and the plan and decision kinds as Python
enums with their one mapping to the wire's (so neither side compares strings or magic numbers).
"""

import enum

# Master and workers must speak the same version of this contract (checked at registration): enum
# numbers and field meanings change between versions (2: CommitReply.Decision starts at UNSPECIFIED;
# 3: per-registration session keys, errors as fields, the code package, the rendezvous store on
# the master's channel; 4: plugin reports on commits, plugin inputs and state on plans, EVAL plans;
# 5: step metrics (gradient norm, fp16 skip, learning rate) on commits; 6: the step's evaluation on
# commit replies, step_fn's metrics in the step metrics, the error of a failed reduction on commits, the last abort in the status).
PROTOCOL_VERSION = 6

# Both ends of the wire: a checkpoint plan carries the job's whole loss history, 8 bytes a step;
# gRPC's default 4 MiB would end a job at about 500,000 steps, 512 MiB at 64 million. (The master
# caps what it receives far lower: see ``scheduler/servicer.py``.)
MESSAGE_LIMITS = [("grpc.max_receive_message_length", 512 * 2**20), ("grpc.max_send_message_length", 512 * 2**20)]
# What the master accepts in one request. The largest is a commit that carries the plugins' reports:
# about 20 bytes per sample of a step, and, once per epoch, of the worker's share of the evaluation
# pass (a worker refuses to send more, naming the fix: ``runtime/master_client.py``).
MAX_REQUEST_BYTES = 8 * 2**20


EPOCH_STORE_PREFIX = "epoch/"


def epoch_store_prefix(membership_epoch: int) -> str:
    """The key prefix under which membership epoch ``membership_epoch`` rendezvouses in the store
    (the master drops an epoch's keys once it is superseded)."""
    return f"{EPOCH_STORE_PREFIX}{membership_epoch}/"


TOKEN_METADATA_KEY = "vnodes-token"  # gRPC metadata that carries the job's shared token

# Plan.sync_source_rank: >= 0 names the rank that broadcasts its state to the epoch's other members.
SYNC_NONE = -1  # every member holds the state of the step
SYNC_FROM_CHECKPOINT = -2  # nobody does: every member loads the newest checkpoint


class PlanKind(str, enum.Enum):
    """What a worker does next (``Plan.Kind`` on the wire)."""

    RUN = "run"
    WAIT = "wait"
    STOP = "stop"
    CHECKPOINT = "checkpoint"  # rank 0 writes a checkpoint of the state it holds; the others wait
    EVAL = "eval"  # the plugins' evaluation pass alone (after the last step), committed like a step


class Decision(str, enum.Enum):
    """How the master decided a step (``CommitReply.Decision`` on the wire)."""

    COMMIT = "commit"  # every member reported: each applies the step
    ABORT = "abort"  # the epoch was superseded or a member failed: redo the step in the next epoch


def plan_kind_to_wire(kind: PlanKind) -> int:
    from . import vnodes_pb2 as pb

    return pb.Plan.Kind.Value(kind.name)


def plan_kind_from_wire(value: int) -> PlanKind:
    from . import vnodes_pb2 as pb

    return PlanKind[pb.Plan.Kind.Name(value)]


def decision_to_wire(decision: Decision) -> int:
    from . import vnodes_pb2 as pb

    return pb.CommitReply.Decision.Value(decision.name)


def decision_from_wire(value: int) -> Decision:
    """Raises ``KeyError`` for a value that is not COMMIT or ABORT (e.g. REFUSED, UNSPECIFIED)."""
    from . import vnodes_pb2 as pb

    return Decision[pb.CommitReply.Decision.Name(value)]


COLUMN_DTYPES = ("f4", "f8", "i4", "i8", "u1")  # what a PluginData column may hold (little-endian)
MAX_COLUMN_NAME = 64


def pack_samples(message, plugin: str, indices, columns: dict) -> None:
    """Fill ``message`` (a ``PluginData``) with ``plugin``'s rows: int64 ``indices`` and the
    ``columns`` (name -> 1-D numpy array), little-endian, one copy each."""
    import numpy as np

    message.plugin = plugin
    message.indices = np.ascontiguousarray(indices, dtype="<i8").tobytes()
    for name, values in columns.items():
        values = np.ascontiguousarray(values)
        code = values.dtype.str[1:]
        message.columns.add(name=name, dtype=code, data=values.astype("<" + code, copy=False).tobytes())


def unpack_samples(message) -> tuple:
    """``(plugin, indices, {name: values})`` of a ``PluginData``, as numpy arrays over its bytes.

    Raises:
        ValueError: a malformed message (naming what is wrong).
    """
    import numpy as np

    if len(message.indices) % 8:
        raise ValueError(f"plugin {message.plugin!r}: indices hold {len(message.indices)} bytes, not a multiple of 8")
    indices = np.frombuffer(message.indices, dtype="<i8")
    columns = {}
    for column in message.columns:
        if not column.name or len(column.name) > MAX_COLUMN_NAME or column.name in columns:
            raise ValueError(f"plugin {message.plugin!r}: column name {column.name[:80]!r} is empty, too long or repeated")
        if column.dtype not in COLUMN_DTYPES:
            raise ValueError(f"plugin {message.plugin!r}: column {column.name!r} has dtype {column.dtype[:16]!r}, "
                             f"not one of {COLUMN_DTYPES}")
        dtype = np.dtype("<" + column.dtype)
        if len(column.data) != dtype.itemsize * len(indices):
            raise ValueError(f"plugin {message.plugin!r}: column {column.name!r} holds {len(column.data)} bytes for "
                             f"{len(indices)} rows of {column.dtype}")
        columns[column.name] = np.frombuffer(column.data, dtype=dtype)
    return message.plugin, indices, columns
