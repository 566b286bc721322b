"""Operator commands against a running registry: ``shoal ls`` and ``shoal watch``.

Both take the replicas of one registry (``--registry a,b,c``): ``ls`` asks them in
turn until one is reached; ``watch`` moves to the next when the one it follows fails,
resuming from the last revision it showed, so over a shared store nothing is missed
and nothing is shown twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_cli.errors import UserError
from shoal_cli.operator import ask_registry, operator_identity, registry_channel
from shoal_cli.options import REGISTRIES, F
from shoal_cli.output import emit_json, say
from shoal_cli.render import emit_table, message_json
from shoal_core.replicas import Replicas

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
    """``--registry`` (``SHOAL_REGISTRY``): the registry's address, or its replicas'
    comma-separated; the command gets them as a tuple."""
    return click.option(
        "--registry",
        type=REGISTRIES,
        default="127.0.0.1:7700",
        show_default=True,
        envvar="SHOAL_REGISTRY",
        help="Registry address, or the addresses of its replicas comma-separated, "
        "tried in turn (env SHOAL_REGISTRY).",
    )


def unreachable(what: str, address: str | Sequence[str], exc: grpc.aio.AioRpcError) -> UserError:
    """The user error for ``address`` (or every one of a registry's replicas) not
    reached, with a hint when it may be for want of an identity."""
    named = address if isinstance(address, str) else ", ".join(address)
    if not isinstance(address, str) and len(address) > 1:
        named = f"replicas {named} (each)"
    hint = ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and operator_identity(address) is None:
        # A plaintext call to an mTLS port ends in a closed socket: say what may be missing.
        hint = (
            "; if it runs mTLS, set SHOAL_IDENTITY_SERVER, SHOAL_TRUST_BUNDLE and "
            "SHOAL_TOKEN_FILE (an operator token), or run this where its `shoal up` runs"
        )
    return UserError(f"{what} {named} is unreachable ({exc.code().name}: {exc.details()}){hint}")


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


async def _ls(registries: Sequence[str]) -> tuple[pb.ListServicesResponse, pb.DiscoverResponse]:
    async def ask(channel: grpc.aio.Channel) -> tuple[pb.ListServicesResponse, pb.DiscoverResponse]:
        stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
        listing = await stub.ListServices(pb.ListServicesRequest(), timeout=5)
        found = await stub.Discover(pb.DiscoverRequest(include_unhealthy=True), timeout=5)
        return listing, found

    try:
        return await ask_registry(registries, ask)
    except grpc.aio.AioRpcError as exc:
        raise unreachable("registry", registries, exc) from None


@click.command()
@registry_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(registry: tuple[str, ...], as_json: bool) -> None:
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


class _Watching:
    """One ``shoal watch``: what it asks for, what is still to show and for how long,
    and the revision shown last, to resume from at another replica."""

    def __init__(self, service: str, count: int, seconds: float, as_json: bool) -> None:
        self._service = service
        self._left = count or None
        self._stop = time.monotonic() + seconds if seconds else None
        self._as_json = as_json
        self.revision = 0
        self.shown = 0

    def request(self) -> pb.WatchRequest:
        return pb.WatchRequest(service=self._service, since_revision=self.revision)

    def seconds(self) -> float | None:
        return None if self._stop is None else max(0.0, self._stop - time.monotonic())

    def show(self, event: pb.WatchEvent) -> bool:
        """Show ``event``; True when it was the last wanted."""
        # A snapshot starts afresh at its revision; the rest only go up.
        if event.type == pb.WatchEvent.SNAPSHOT:
            self.revision = event.revision
        self.revision = max(self.revision, event.revision)
        _show(event, self._as_json)
        self.shown += 1
        if self._left is not None:
            self._left -= 1
        return self._left == 0


async def _follow(address: str, registries: Sequence[str], watching: _Watching) -> bool:
    """Show the watch at ``address``; True when done, False when the registry ended it."""
    async with registry_channel(address, among=registries) as channel:
        stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
        call = stub.Watch(watching.request())
        try:
            while True:
                try:
                    event = await asyncio.wait_for(call.read(), watching.seconds())
                except TimeoutError:
                    return True
                if not isinstance(event, pb.WatchEvent):
                    return False
                if watching.show(event):
                    return True
        finally:
            call.cancel()


async def _watch(registries: Sequence[str], watching: _Watching) -> None:
    replicas = Replicas(registries)
    # Replicas in a row that failed before showing anything: all of them is the end.
    misses = 0
    while True:
        address, before = replicas.current, watching.shown
        try:
            if await _follow(address, registries, watching):
                return
            why, failure = "ended the watch stream", None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise unreachable("registry", address, exc) from None
            why, failure = f"is unreachable ({exc.code().name}: {exc.details()})", exc
        misses = 1 if watching.shown > before else misses + 1
        if misses >= len(replicas):
            if failure is not None:
                raise unreachable("registry", registries, failure) from None
            raise UserError(f"registry {address} {why}")
        move = replicas.failed(address)
        assert move is not None
        say(f"shoal: registry {address} {why}; watching at {move.to}", err=True)


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
def watch(
    registry: tuple[str, ...], service: str, count: int, seconds: float, as_json: bool
) -> None:
    """Follow registry events live: a snapshot, then every change."""
    try:
        asyncio.run(_watch(registry, _Watching(service, count, seconds, as_json)))
    except KeyboardInterrupt:
        return
