"""vnodes.protos: the wire contract between workers and the master."""
