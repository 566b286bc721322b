"""``shoal health``: a grpc.health.v1 probe, for scripts and container health checks."""

from __future__ import annotations

import asyncio

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal_cli.errors import UserError
from shoal_cli.options import ADDRESS, json_option
from shoal_cli.output import emit_json

__all__ = ["health"]


async def _check(address: str, service: str, timeout: float) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise UserError(f"{address} does not know service {service!r}") from None
            raise UserError(f"{address} is unreachable ({exc.code().name})") from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@click.command()
@click.argument("address", type=ADDRESS)
@click.option("--service", default="", help="Service name to check; empty checks the server.")
@click.option(
    "--timeout", type=click.FloatRange(min=0.0, min_open=True), default=3.0, show_default=True
)
@json_option()
def health(address: str, service: str, timeout: float, as_json: bool) -> int:
    """Check ADDRESS with grpc.health.v1; exit 0 when SERVING, 1 otherwise."""
    status = asyncio.run(_check(address, service, timeout))
    if as_json:
        emit_json({"address": address, "service": service, "status": status})
    else:
        click.echo(status)
    return 0 if status == "SERVING" else 1
