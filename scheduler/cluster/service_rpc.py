"""The cluster service's gRPC face (``protos/cluster.proto``) and its client: the only modules
of the service that touch the generated ``cluster_pb2`` types.

Each error maps to one status code:

| error                         | status code       |
|-------------------------------|-------------------|
| BadRequest (a field, named)   | INVALID_ARGUMENT  |
| no job with that id           | NOT_FOUND         |
| missing or wrong token        | UNAUTHENTICATED   |
| anything else                 | INTERNAL (logged) |
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc
from google.protobuf.message import DecodeError

from vnodes.protos import MESSAGE_LIMITS, PROTOCOL_VERSION, TOKEN_METADATA_KEY, cluster_pb2 as pb
from vnodes.runtime.errors import VnodesError

from ..code_package import max_code_bytes
from ..errors import BadRequest
from ..servicer import serve
from .service import ClusterService, Submission

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
SERVICE = "vnodes.v1.Cluster"


class ClusterError(VnodesError):
    """A call to the cluster service failed: its reason, as the service gave it."""

    def __init__(self, address: str, detail: str):
        super().__init__(address, detail)
        self.address, self.detail = address, detail

    def __str__(self) -> str:
        return f"the cluster service at {self.address}: {self.detail}"


class ClusterServicer:
    def __init__(self, service: ClusterService):
        self.service = service

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Submit": unary(self._guarded(pb.SubmitRequest, self._submit),
                            response_serializer=pb.SubmitReply.SerializeToString),
            "Jobs": unary(self._guarded(pb.JobsRequest, self._jobs), response_serializer=pb.JobsReply.SerializeToString),
            "Cancel": unary(self._guarded(pb.CancelRequest, self._cancel),
                            response_serializer=pb.CancelReply.SerializeToString),
        })

    @staticmethod
    def _guarded(kind, method):
        """Parse the body as ``kind``, run ``method`` off the event loop, map errors to codes."""

        async def call(data: bytes, context):
            try:
                try:
                    request = kind.FromString(data)
                except DecodeError as exc:
                    raise BadRequest(f"the request body does not decode as {kind.__name__} ({exc})") from None
                return await asyncio.to_thread(method, request)
            except BadRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except KeyError as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"no job {exc.args[0]!r} here; `vnodes jobs` lists the ids")
            except Exception as exc:  # noqa: BLE001 - every error becomes a status, the service survives
                if isinstance(exc, (grpc.RpcError, asyncio.CancelledError)) or type(exc).__name__ == "AbortError":
                    raise
                log.error("internal error in %s", kind.__name__, exc_info=exc)
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

        return call

    def _submit(self, r: pb.SubmitRequest) -> pb.SubmitReply:
        if r.protocol_version != PROTOCOL_VERSION:
            raise BadRequest(f"the client speaks vnodes protocol {r.protocol_version}, this service "
                             f"{PROTOCOL_VERSION}: submit with the service's vnodes version")
        job_id = self.service.submit(Submission(
            name=r.name, job=r.job, code=r.code, steps=r.steps, priority=r.priority, run_dir=r.run_dir,
            deterministic=r.deterministic, overrides=tuple(r.overrides), virtual_nodes=r.virtual_nodes,
            requested_workers=r.requested_workers, checkpoint_every=r.checkpoint_every))
        return pb.SubmitReply(id=job_id)

    def _jobs(self, r: pb.JobsRequest) -> pb.JobsReply:
        reply = pb.JobsReply(policy=self.service.policy_name, pool_workers=self.service.pool.size)
        for j in self.service.jobs():
            reply.jobs.add(**j)
        return reply

    def _cancel(self, r: pb.CancelRequest) -> pb.CancelReply:
        return pb.CancelReply(state=self.service.cancel(r.id))


def serve_cluster(service: ClusterService, host: str, port: int, token: Optional[str]):
    """Serve ``service`` (``servicer.serve``: a token is required beyond loopback); returns the
    server and the bound port. Requests may carry a job's code: up to the code cap, plus 1 MiB.

    Raises:
        InsecureListen, CannotListen: as ``servicer.serve``.
    """
    return serve(ClusterServicer(service), host=host, port=port, token=token,
                 max_request_bytes=max_code_bytes() + 2**20)


class ClusterClient:
    """``vnodes submit``, ``jobs`` and ``cancel``'s side of the wire."""

    def __init__(self, address: str, token: Optional[str] = None):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=MESSAGE_LIMITS)  # 512 MiB: past the code cap
        self.metadata = ((TOKEN_METADATA_KEY, token),) if token else ()

    def _call(self, name: str, request, reply_kind, timeout_s: float):
        method = self.channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=type(request).SerializeToString,
                                          response_deserializer=reply_kind.FromString)
        try:
            return method(request, timeout=timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or exc.code().name
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                details = (f"no answer ({details}); is `vnodes cluster` running there? (its default port is "
                           f"{DEFAULT_PORT})")
            raise ClusterError(self.address, details) from None

    def submit(self, *, name: str, job: str, code: bytes, steps: int, priority: int, run_dir: str,
               deterministic: bool, overrides: list[str], virtual_nodes: int, requested_workers: int,
               checkpoint_every: int, timeout_s: float = 120.0) -> str:
        """Queue a job; returns its id. Raises ``ClusterError`` with the service's reason."""
        request = pb.SubmitRequest(protocol_version=PROTOCOL_VERSION, name=name, job=job, code=code, steps=steps,
                                   priority=priority, run_dir=run_dir, deterministic=deterministic,
                                   overrides=overrides, virtual_nodes=virtual_nodes,
                                   requested_workers=requested_workers, checkpoint_every=checkpoint_every)
        return self._call("Submit", request, pb.SubmitReply, timeout_s).id

    def jobs(self, timeout_s: float = 10.0) -> dict:
        """``{"policy", "pool_workers", "jobs": [{id, name, state, priority, workers, step, steps, ...}]}``."""
        reply = self._call("Jobs", pb.JobsRequest(), pb.JobsReply, timeout_s)
        fields = ("id", "name", "state", "priority", "workers", "step", "steps", "run_dir", "message",
                  "submitted_at", "virtual_nodes", "resizes")
        return {"policy": reply.policy, "pool_workers": reply.pool_workers,
                "jobs": [{f: getattr(j, f) for f in fields} for j in reply.jobs]}

    def cancel(self, job_id: str, timeout_s: float = 10.0) -> str:
        """Returns the job's state after the request. Raises ``ClusterError`` (e.g. an unknown id)."""
        return self._call("Cancel", pb.CancelRequest(id=job_id), pb.CancelReply, timeout_s).state

    def close(self) -> None:
        self.channel.close()
