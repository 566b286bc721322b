"""Server reflection, both ways: what an app serves (asked of it, for membership), and
what the sidecar answers about its own services (grpc.health.v1 and reflection).

Only protobuf messages here: the data plane carries the calls (``rpc``, ``own``).
"""

from __future__ import annotations

import logging

from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from proxy_sidecar.errors import MembershipError
from proxy_sidecar.rpc import Rpc, RpcError
from shoal_core.codes import INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED

__all__ = ["OWN_SERVICES", "answer", "list_services"]

logger = logging.getLogger(__name__)

_RPC_TIMEOUT = 3.0
_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
# Services every gRPC server may carry that are not part of the app's mesh surface.
_NOT_MESH = ("grpc.health.v1.", "grpc.reflection.")
# What the sidecar itself serves to its app.
OWN_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    rpb.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
)
_OWN_FILES = {d.name: d for d in (health_pb2.DESCRIPTOR, rpb.DESCRIPTOR)}


async def list_services(rpc: Rpc, app: str) -> tuple[str, ...]:
    """The app's gRPC services; ``MembershipError`` when reflection cannot say."""
    request = rpb.ServerReflectionRequest(list_services="")
    try:
        async for reply in rpc.stream(
            app, _INFO, request, rpb.ServerReflectionResponse, timeout=_RPC_TIMEOUT
        ):
            names = [s.name for s in reply.list_services_response.service]
            found = tuple(n for n in names if not n.startswith(_NOT_MESH))
            if found:
                return found
            break
    except RpcError as exc:
        raise MembershipError(
            f"cannot list the gRPC services of the app at {app} through server "
            f"reflection ({exc.name}); name them with --grpc-service"
        ) from None
    raise MembershipError(f"the app at {app} lists no gRPC services; name them with --grpc-service")


def _files(request: rpb.ServerReflectionRequest) -> list[bytes] | None:
    """The files a file request asks for, among the sidecar's own; None if not one of them."""
    kind = request.WhichOneof("message_request")
    if kind == "file_by_filename":
        found = _OWN_FILES.get(request.file_by_filename)
        return None if found is None else [found.serialized_pb]
    if kind == "file_containing_symbol":
        try:
            file = descriptor_pool.Default().FindFileContainingSymbol(
                request.file_containing_symbol
            )
        except KeyError:
            return None
        return [file.serialized_pb] if file.name in _OWN_FILES else None
    return None


def answer(request_bytes: bytes) -> bytes:
    """The sidecar's reply to one reflection request about its own services."""
    try:
        request = rpb.ServerReflectionRequest.FromString(request_bytes)
    except DecodeError:
        reply = rpb.ServerReflectionResponse()
        reply.error_response.error_code = INVALID_ARGUMENT
        reply.error_response.error_message = "the request does not decode"
        return bytes(reply.SerializeToString())
    reply = rpb.ServerReflectionResponse(valid_host=request.host, original_request=request)
    kind = request.WhichOneof("message_request")
    if kind == "list_services":
        reply.list_services_response.service.extend(
            rpb.ServiceResponse(name=name) for name in OWN_SERVICES
        )
    elif kind in ("file_by_filename", "file_containing_symbol"):
        files = _files(request)
        if files is None:
            reply.error_response.error_code = NOT_FOUND
            reply.error_response.error_message = "not found"
        else:
            reply.file_descriptor_response.file_descriptor_proto.extend(files)
    else:
        reply.error_response.error_code = UNIMPLEMENTED
        reply.error_response.error_message = f"{kind or 'an empty request'} is not served here"
    return bytes(reply.SerializeToString())
