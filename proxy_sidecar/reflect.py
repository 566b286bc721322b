"""What an app serves, read through its server reflection: its gRPC service names.

Only membership uses this, at start-up, for an app whose services are not listed
in the config; the forwarding path never decodes a message.
"""

from __future__ import annotations

import logging

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proxy_sidecar.errors import MembershipError

__all__ = ["list_services"]

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
