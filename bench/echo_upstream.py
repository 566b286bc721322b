"""A minimal Echo-like gRPC upstream for the sidecar benchmark: raw bytes in, same bytes out.

``python -m bench.echo_upstream`` prints ``echo upstream serving on 127.0.0.1:PORT``.
The method is ``/bench.Echo/Echo``; the body is passed through undecoded, like
a worker's ``Echo(bytes payload = 1)`` answering with its request.
"""

from __future__ import annotations

import asyncio

import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def main() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo upstream serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
