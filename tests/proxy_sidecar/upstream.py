"""A raw-bytes gRPC service for the sidecar tests, in-process or as a real subprocess.

``test.Echo`` has the four call shapes. Every response carries ``x-served-by``
(initial and trailing metadata) and echoes request metadata ``x-*`` keys back
as ``echo-*``. Request metadata steers it: ``x-fail`` = a status code name to
fail with (details and a trailing ``x-reason`` say so), ``x-sleep`` = seconds to
wait first, ``x-cancel`` = answer CANCELLED. Instance-wide ``fail_with`` and
``delay`` do the same for every call. It counts calls, remembers each call's
remaining deadline, and counts calls that were cancelled under it.

Run ``python -m tests.proxy_sidecar.upstream NAME`` to get a separate process
that prints ``upstream NAME serving on HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import AsyncIterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

Context = grpc.aio.ServicerContext[bytes, bytes]

SERVICE = "test.Echo"
OTHER = "test.Other"


def _describe() -> None:
    """Put test.Echo's schema in the default pool, so reflection describes it like a real app's.

    The handlers stay raw bytes; only reflection reads this (a sidecar with no
    services in its settings lists the app's from it).
    """
    file = descriptor_pb2.FileDescriptorProto(name="shoal_test_echo.proto", package="test")
    file.message_type.add(name="Bytes").field.add(
        name="data", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    )
    shapes = {
        "Unary": (False, False),
        "ServerStream": (False, True),
        "ClientStream": (True, False),
        "Bidi": (True, True),
    }
    for name, methods in (("Echo", shapes), ("Other", {"Unary": (False, False)})):
        service = file.service.add(name=name)
        for method, (client_streaming, server_streaming) in methods.items():
            service.method.add(
                name=method,
                input_type=".test.Bytes",
                output_type=".test.Bytes",
                client_streaming=client_streaming,
                server_streaming=server_streaming,
            )
    descriptor_pool.Default().AddSerializedFile(file.SerializeToString())


_describe()


class Upstream:
    """One upstream instance; ``async with`` starts and stops it."""

    def __init__(self, name: str, *, port: int = 0) -> None:
        self.name = name
        self._port = port
        self.calls: collections.Counter[str] = collections.Counter()
        self.deadlines: list[float | None] = []
        self.cancelled = 0
        self.seen_metadata: list[dict[str, str | bytes]] = []
        self.fail_with: grpc.StatusCode | None = None
        self.delay = 0.0
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    async def __aenter__(self) -> Upstream:
        server = grpc.aio.server()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(SERVICE, handlers),
                grpc.method_handlers_generic_handler(OTHER, {"Unary": handlers["Unary"]}),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE, OTHER, "grpc.health.v1.Health", reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{self._port}")
        await server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def _begin(self, method: str, context: Context) -> None:
        self.calls[method] += 1
        self.deadlines.append(context.time_remaining())
        received = {k: v for k, v in context.invocation_metadata() or ()}
        self.seen_metadata.append(received)
        echoed = [(f"echo-{k[2:]}", v) for k, v in received.items() if k.startswith("x-")]
        await context.send_initial_metadata([("x-served-by", self.name), *echoed])
        context.set_trailing_metadata([("x-served-by", self.name)])
        sleep = float(str(received.get("x-sleep", self.delay)))
        try:
            if sleep:
                await asyncio.sleep(sleep)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if "x-cancel" in received:
            await context.abort(grpc.StatusCode.CANCELLED, f"{self.name} cancelled the call")
        code = self.fail_with
        if "x-fail" in received:
            code = grpc.StatusCode[str(received["x-fail"])]
        if code is not None:
            context.set_trailing_metadata([("x-served-by", self.name), ("x-reason", "asked")])
            await context.abort(code, f"{self.name} failed as asked ({code.name})")

    async def _unary(self, request: bytes, context: Context) -> bytes:
        await self._begin("Unary", context)
        return self.name.encode() + b":" + request

    async def _server_stream(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        await self._begin("ServerStream", context)
        count, _, pause = request.decode().partition(",")
        try:
            for i in range(int(count)):
                if pause:
                    await asyncio.sleep(float(pause))
                yield f"{self.name}:{i}".encode()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _client_stream(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        await self._begin("ClientStream", context)
        parts = [r async for r in requests]
        return self.name.encode() + b":" + b"+".join(parts)

    async def _bidi(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        await self._begin("Bidi", context)
        try:
            async for request in requests:
                yield self.name.encode() + b":" + request
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def _main(name: str) -> None:
    async with Upstream(name) as upstream:
        print(f"upstream {name} serving on {upstream.address}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
