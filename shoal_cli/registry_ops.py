"""Operator commands against a running registry: ``shoal ls`` and ``shoal watch``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_cli.errors import UserError
from shoal_cli.operator import operator_identity, registry_channel
from shoal_cli.options import ADDRESS, F
from shoal_cli.output import emit_json
from shoal_cli.render import emit_table, message_json

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub

__all__ = ["ls", "registry_option", "watch"]

_EVENT = {
    pb.WatchEvent.SNAPSHOT: "snapshot",
    pb.WatchEvent.UPSERT: "upsert",
    pb.WatchEvent.REMOVE: "remove",
    pb.WatchEvent.PROGRESS: "progress",
}


def registry_option() -> Callable[[F], F]:
    return click.option(
        "--registry",
        type=ADDRESS,
        default="127.0.0.1:7700",
        show_default=True,
        envvar="SHOAL_REGISTRY",
        help="Registry address (env SHOAL_REGISTRY).",
    )


def unreachable(what: str, address: str, exc: grpc.aio.AioRpcError) -> UserError:
    hint = ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and operator_identity(address) is None:
        # A plaintext call to an mTLS port ends in a closed socket: say what may be missing.
        hint = (
            "; if it runs mTLS, set SHOAL_IDENTITY_SERVER, SHOAL_TRUST_BUNDLE and "
            "SHOAL_TOKEN_FILE (an operator token), or run this where its `shoal up` runs"
        )
    return UserError(f"{what} {address} is unreachable ({exc.code().name}: {exc.details()}){hint}")


COLUMNS = [
    ("service", "SERVICE"),
    ("instance", "INSTANCE"),
    ("address", "ADDRESS"),
    ("health", "HEALTH"),
    ("load", "LOAD"),
    ("zone", "ZONE"),
    ("weight", "WEIGHT"),
    ("lease_age", "LEASE AGE"),
]
# On a narrow terminal: what must stay whole (what an operator copies out of the
# table), and what goes first to make room for it.
KEEP = ("instance", "address")
DROP_FIRST = ("weight", "zone", "load", "lease_age", "health", "service")


def instance_row(inst: pb.Instance) -> dict[str, Any]:
    """One instance as a table row (JSON output uses the message itself)."""
    health = "healthy" if inst.healthy else "lapsed"
    return {
        "service": inst.service,
        "instance": inst.instance_id,
        "address": inst.address,
        "health": f"{health}/{pb.ServingStatus.Name(inst.status)}",
        "load": f"{inst.load.in_flight} in flight, {inst.load.queue_depth} queued, "
        f"{inst.load.cpu_percent:.0f}% cpu",
        "zone": inst.zone or "-",
        "weight": inst.weight,
        "lease_age": f"{inst.lease_age_seconds:.1f}s",
    }


async def _ls(address: str) -> tuple[pb.ListServicesResponse, pb.DiscoverResponse]:
    async with registry_channel(address) as channel:
        stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
        try:
            listing = await stub.ListServices(pb.ListServicesRequest(), timeout=5)
            found = await stub.Discover(pb.DiscoverRequest(include_unhealthy=True), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise unreachable("registry", address, exc) from None
    return listing, found


@click.command()
@registry_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(registry: str, as_json: bool) -> None:
    """List services and instances: health, load, lease age."""
    listing, found = asyncio.run(_ls(registry))
    instances = sorted(found.instances, key=lambda i: (i.service, i.instance_id))
    state = listing.state
    if as_json:
        emit_json({**message_json(listing), "instances": [message_json(i) for i in instances]})
        return
    title = (
        f"{len(listing.services)} services, {state.instances_healthy}/"
        f"{state.instances_total} instances healthy, {state.watchers} watchers"
    )
    rows = [instance_row(i) for i in instances]
    emit_table(title, COLUMNS, rows, keep=KEEP, drop_first=DROP_FIRST)
    if state.self_preservation:
        click.echo(f"registry is in self-preservation: {state.self_preservation_reason}")


async def _watch(address: str, service: str, count: int, seconds: float, as_json: bool) -> None:
    stop = time.monotonic() + seconds if seconds else None
    async with registry_channel(address) as channel:
        stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
        call = stub.Watch(pb.WatchRequest(service=service))
        shown = 0
        try:
            while not count or shown < count:
                left = None if stop is None else stop - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(call.read(), left)
                except TimeoutError:
                    break
                if not isinstance(event, pb.WatchEvent):
                    raise UserError(f"registry {address} ended the watch stream")
                _show(event, as_json)
                shown += 1
        except grpc.aio.AioRpcError as exc:
            raise unreachable("registry", address, exc) from None
        finally:
            call.cancel()


def _show(event: pb.WatchEvent, as_json: bool) -> None:
    kind = _EVENT.get(event.type, "?")
    if as_json:
        # One compact object per line, so a consumer can parse the stream line by line.
        click.echo(json.dumps(message_json(event), sort_keys=True))
        return
    stamp = time.strftime("%H:%M:%S")
    if event.type == pb.WatchEvent.PROGRESS:
        click.echo(f"{stamp} rev {event.revision} progress")
        return
    if event.type == pb.WatchEvent.SNAPSHOT:
        click.echo(f"{stamp} rev {event.revision} snapshot: {len(event.instances)} instances")
    for inst in event.instances:
        row = instance_row(inst)
        click.echo(
            f"{stamp} rev {event.revision} {kind} {row['service']}/{row['instance']} "
            f"{row['address']} {row['health']} load {row['load']}"
        )


@click.command()
@registry_option()
@click.option("--service", default="", help="Only this service (default: all).")
@click.option("--count", type=click.IntRange(min=0), default=0, help="Stop after N events.")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Stop after this long (default: until Ctrl-C).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def watch(registry: str, service: str, count: int, seconds: float, as_json: bool) -> None:
    """Follow registry events live: a snapshot, then every change."""
    try:
        asyncio.run(_watch(registry, service, count, seconds, as_json))
    except KeyboardInterrupt:
        return
