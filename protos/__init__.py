"""vnodes.protos: the wire contract between workers and the master."""

# Both ends of the wire: a checkpoint plan carries the job's whole loss history, 8 bytes a step;
# gRPC's default 4 MiB would end a job at about 500,000 steps, 512 MiB at 64 million.
# Master and workers must speak the same version of this contract (checked at registration): enum
# numbers and field meanings change between versions (2: CommitReply.Decision starts at UNSPECIFIED).
PROTOCOL_VERSION = 2

MESSAGE_LIMITS = [("grpc.max_receive_message_length", 512 * 2**20), ("grpc.max_send_message_length", 512 * 2**20)]
