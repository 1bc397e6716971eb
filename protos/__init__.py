"""vnodes.protos: the wire contract between workers and the master."""

# Master and workers must speak the same version of this contract (checked at registration): enum
# numbers and field meanings change between versions (2: CommitReply.Decision starts at UNSPECIFIED;
# 3: per-registration session keys, errors as fields, the code package, the rendezvous store on
# the master's channel).
PROTOCOL_VERSION = 3

# Both ends of the wire: a checkpoint plan carries the job's whole loss history, 8 bytes a step;
# gRPC's default 4 MiB would end a job at about 500,000 steps, 512 MiB at 64 million. (The master
# caps what it receives far lower: see ``scheduler/servicer.py``.)
MESSAGE_LIMITS = [("grpc.max_receive_message_length", 512 * 2**20), ("grpc.max_send_message_length", 512 * 2**20)]


EPOCH_STORE_PREFIX = "epoch/"


def epoch_store_prefix(membership_epoch: int) -> str:
    """The key prefix under which membership epoch ``membership_epoch`` rendezvouses in the store
    (the master drops an epoch's keys once it is superseded)."""
    return f"{EPOCH_STORE_PREFIX}{membership_epoch}/"
