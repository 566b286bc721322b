"""What an app serves, read through its server reflection: service names and unary methods.

Only membership (at start-up) and tools use this; the forwarding path never
decodes a message. Shapes are best effort: an app whose reflection cannot give
a service's file descriptor still joins the mesh, and its calls take the
general stream path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proxy_sidecar.errors import MembershipError

__all__ = ["list_services", "unary_methods"]

logger = logging.getLogger(__name__)

_RPC_TIMEOUT = 3.0
# Services every gRPC server may carry that are not part of the app's mesh surface.
_NOT_MESH = ("grpc.health.v1.", "grpc.reflection.")


async def list_services(channel: grpc.aio.Channel, app: str) -> tuple[str, ...]:
    """The app's gRPC services; ``MembershipError`` when reflection cannot say."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=_RPC_TIMEOUT):
            names = [s.name for s in reply.list_services_response.service]
            found = tuple(n for n in names if not n.startswith(_NOT_MESH))
            if found:
                return found
    except grpc.aio.AioRpcError as exc:
        raise MembershipError(
            f"cannot list the gRPC services of the app at {app} through server "
            f"reflection ({exc.code().name}); name them with --grpc-service"
        ) from None
    raise MembershipError(f"the app at {app} lists no gRPC services; name them with --grpc-service")


async def unary_methods(
    channel: grpc.aio.Channel, services: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """The unary-unary methods of each service whose descriptor reflection gives.

    Services it cannot describe are left out (their shapes stay unknown); an app
    without reflection gives ``{}``.
    """
    wanted = tuple(services)
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in wanted]
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    found: dict[str, tuple[str, ...]] = {}
    try:
        async for reply in stub.ServerReflectionInfo(iter(requests), timeout=_RPC_TIMEOUT):
            service = reply.original_request.file_containing_symbol
            if service not in wanted or not reply.HasField("file_descriptor_response"):
                continue
            methods = _unary_in(service, reply.file_descriptor_response.file_descriptor_proto)
            if methods is not None:
                found[service] = methods
    except grpc.aio.AioRpcError as exc:
        logger.warning(
            "cannot read method shapes through reflection (%s); all calls take the stream path",
            exc.code().name,
        )
    return found


def _unary_in(service: str, files: Iterable[bytes]) -> tuple[str, ...] | None:
    """The unary methods of ``service`` among serialized ``FileDescriptorProto``s."""
    for raw in files:
        try:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except DecodeError:
            continue
        prefix = f"{proto.package}." if proto.package else ""
        for declared in proto.service:
            if prefix + declared.name == service:
                return tuple(
                    m.name
                    for m in declared.method
                    if not m.client_streaming and not m.server_streaming
                )
    return None
