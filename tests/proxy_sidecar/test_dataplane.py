"""The data plane's boundary: its listeners' roles and limits, its pool, its logs.

Real data planes on 127.0.0.1:0, real upstreams; a raw HTTP/2 client (``tests.h2raw``)
where a test must send what grpcio will not. A few tests drive a ``DataPlane`` with a
small control plane of their own: the control plane is pure logic, and these tests are
about what the data plane does with its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import h2.events
import h2.settings
import psutil
import pytest
from shoal_dataplane import Admission, DataPlane, Refusal

from protos import registry_pb2 as rpb
from protos import registry_pb2_grpc as rpb_grpc
from tests.h2peers import RawH2
from tests.proxy_sidecar.conftest import healthz, served_by, sidecar_config, wait_for
from tests.proxy_sidecar.test_cli import SHOAL
from tests.proxy_sidecar.upstream import SERVICE

UNARY = f"/{SERVICE}/Unary"


# --- listeners: roles ----------------------------------------------------------------


async def test_a_call_to_a_worker_sidecars_inbound_listener_reaches_only_its_own_app(make_mesh):
    mesh = await make_mesh()
    for sidecar, upstream in zip(mesh.sidecars, mesh.upstreams, strict=True):
        before = {u.name: u.total for u in mesh.upstreams}
        assert sidecar.inbound_address is not None
        channel: Any
        async with grpc.aio.insecure_channel(sidecar.inbound_address) as channel:
            unary = channel.unary_unary(UNARY)
            for _ in range(9):
                call = unary(b"direct")
                assert await served_by(call) == upstream.name
                assert await call == f"{upstream.name}:direct".encode()
        after = {u.name: u.total for u in mesh.upstreams}
        # Each of the nine once, at its own app: not balanced, not a second hop.
        assert {n: after[n] - before[n] for n in after} == {
            u.name: 9 if u is upstream else 0 for u in mesh.upstreams
        }


async def test_a_mesh_hop_arriving_at_an_app_facing_listener_is_refused(make_mesh):
    mesh = await make_mesh()
    before = sum(u.total for u in mesh.upstreams)
    for sidecar in (mesh.client, *mesh.sidecars):
        assert sidecar is not None
        channel: Any
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(UNARY)(b"x", metadata=[("shoal-hop", "1")])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "app-facing" in str(info.value.details())
    assert sum(u.total for u in mesh.upstreams) == before


async def test_a_malformed_grpc_timeout_is_answered_internal(make_mesh):
    mesh = await make_mesh()
    assert mesh.client is not None
    address = mesh.client.address
    before = sum(u.total for u in mesh.upstreams)

    def call(timeout: str) -> dict[str, str]:
        with RawH2(address) as raw:
            return raw.call(UNARY, b"x", metadata=[("grpc-timeout", timeout)])

    for bad in ("1.5S", "+5S", "10x", "123456789S", "S"):
        answer = await asyncio.to_thread(call, bad)
        assert answer.get("grpc-status") == "13", (bad, answer)
        assert "grpc-timeout" in answer.get("grpc-message", ""), (bad, answer)
    assert sum(u.total for u in mesh.upstreams) == before
    # A good one goes through.
    assert (await asyncio.to_thread(call, "5S")).get("grpc-status") == "0"


# --- listeners: limits ---------------------------------------------------------------


def _limited(**listeners: Any) -> Any:
    return sidecar_config(listeners=listeners)


async def test_an_idle_connection_gets_goaway_and_is_closed(make_mesh):
    mesh = await make_mesh(_limited(idle_timeout=0.5))
    assert mesh.client is not None
    address = mesh.client.address

    def idle_one() -> tuple[bool, bool]:
        with RawH2(address) as raw:
            raw.settings()
            told = raw.wait(h2.events.ConnectionTerminated, 15)
            gone = raw.wait(None, 15)
            return told, gone

    told, gone = await asyncio.to_thread(idle_one)
    assert told and gone
    # A connection with a call open is not idle, however long the call takes.
    channel: Any
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        replies = [r async for r in stream(b"4,0.4", timeout=30)]
    assert len(replies) == 4


async def test_connections_past_the_cap_are_closed_at_once(make_mesh):
    mesh = await make_mesh(_limited(max_connections=5))
    assert mesh.client is not None
    address = mesh.client.address

    def crowd() -> tuple[list[bool], bool, bool]:
        held = [RawH2(address) for _ in range(5)]
        try:
            admitted = [bool(raw.settings()) for raw in held]
            with RawH2(address) as extra:
                # Closed at once: no SETTINGS, the socket ends.
                refused = extra.wait(None, 10) and not extra.events
            held.pop().close()
            for _ in range(50):
                with RawH2(address) as again:
                    if again.wait(h2.events.RemoteSettingsChanged, 2):
                        return admitted, refused, True
            return admitted, refused, False
        finally:
            for raw in held:
                raw.close()

    admitted, refused, room_again = await asyncio.to_thread(crowd)
    assert admitted == [True] * 5
    assert refused
    assert room_again
    # The app's own calls still work once the crowd is gone.
    assert (await mesh.echo.unary(b"after")).endswith(b":after")


async def test_the_stream_limit_is_announced_in_settings(make_mesh):
    mesh = await make_mesh(_limited(max_streams=7))
    assert mesh.client is not None

    def settings() -> dict[int, int]:
        with RawH2(mesh.client.address) as raw:
            return raw.settings()

    found = await asyncio.to_thread(settings)
    assert found[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7


# --- the upstream pool -----------------------------------------------------------------


class Routing:
    """A control plane that sends every call to one address, or answers what it is told."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.states: list[tuple[str, str]] = []

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Sequence[tuple[str, str]],
        remaining: float | None,
        peer: str | None,
    ) -> Admission | Refusal:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[no-any-return]

    def connection_state(self, address: str, state: str) -> None:
        self.states.append((address, state))


@contextlib.asynccontextmanager
async def running(control: Routing, **options: Any) -> AsyncIterator[tuple[DataPlane, str]]:
    dataplane = DataPlane(control, **options)
    port, _ = dataplane.start("127.0.0.1:0")
    try:
        yield dataplane, f"127.0.0.1:{port}"
    finally:
        await asyncio.to_thread(dataplane.stop, 0.0)


async def test_forgetting_an_endpoint_gives_back_its_connection(upstreams):
    async with running(Routing()) as (dataplane, _):
        for upstream in upstreams:
            dataplane.warm(upstream.address)
        await wait_for(lambda: dataplane.connections() == 3, what="three connections")
        for upstream in upstreams:
            dataplane.forget(upstream.address)
        await wait_for(lambda: dataplane.connections() == 0, what="the count to come back to 0")


async def test_a_peer_that_accepts_and_closes_is_backed_off():
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        # A server preface (empty SETTINGS), then GOAWAY(NO_ERROR), then close: a clean end.
        writer.write(
            bytes.fromhex("000000040000000000")
            + bytes.fromhex("0000080700000000000000000000000000")
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running(Routing()) as (dataplane, _):
            dataplane.warm(f"127.0.0.1:{port}")
            await asyncio.sleep(3.0)
            dataplane.forget(f"127.0.0.1:{port}")
        # With backoff from 0.2 s doubling, 3 s hold a handful of attempts, not hundreds.
        assert 1 <= accepted <= 12, accepted
    finally:
        server.close()
        await server.wait_closed()


async def test_cannot_connect_says_why(make_mesh, registry):
    mesh = await make_mesh()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = rpb_grpc.RegistryStub(channel)
        await stub.Register(
            rpb.RegisterRequest(
                instance=rpb.Instance(
                    instance_id="ghost",
                    service="ghost",
                    address=f"127.0.0.1:{closed}",
                    grpc_services=["test.Ghost"],
                ),
                ttl_ms=30_000,
            )
        )
        assert mesh.client is not None
        client = mesh.client
        # Known, though unreachable: its warm-up connection fails at once.
        await wait_for(
            lambda: len(client.table.members("test.Ghost") or ()) == 1, what="the ghost endpoint"
        )
        assert mesh.channel is not None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.channel.unary_unary("/test.Ghost/M")(b"", timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = str(info.value.details())
    assert f"cannot connect to 127.0.0.1:{closed}" in details
    assert "refused" in details.lower(), details


# --- logs and health ---------------------------------------------------------------------


async def test_control_plane_errors_are_logged_and_answered_internal(caplog):
    caplog.set_level(logging.ERROR, logger="shoal_dataplane")
    control = Routing(ValueError("boom in begin"))
    channel: Any
    async with running(control) as (_, address):
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(UNARY)(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            # Not an Admission nor a Refusal: a bug, said so, and the call gets INTERNAL.
            control.answer = ("a", "tuple")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(UNARY)(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            # The data plane goes on serving: a refusal is passed on as it is.
            control.answer = Refusal(9, "shoal: not now")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(UNARY)(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    records = [r for r in caplog.records if r.name.startswith("shoal_dataplane")]
    text = "\n".join(r.getMessage() for r in records)
    assert all(r.levelno == logging.ERROR for r in records)
    assert "boom in begin" in text and "Traceback" in text
    assert "expected an Admission or a Refusal, got tuple" in text


async def test_per_connection_errors_are_reported_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="shoal_dataplane")
    async with running(Routing()) as (_, address):
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await wait_for(
            lambda: any("handshake" in r.getMessage() for r in caplog.records),
            what="a debug line about the broken handshake",
        )
    found = [r for r in caplog.records if "handshake" in r.getMessage()]
    assert all(r.levelno == logging.DEBUG for r in found)
    assert all(r.name.startswith("shoal_dataplane") for r in found)


async def test_healthz_fails_once_the_data_plane_is_gone(make_mesh):
    mesh = await make_mesh(admin=True)
    assert mesh.client is not None and mesh.client.dataplane is not None
    port = mesh.client.admin_port
    status, body = await healthz(port)
    assert (status, body["dataplane"]) == (200, "running")
    await asyncio.to_thread(mesh.client.dataplane.stop, 0.0)
    status, body = await healthz(port)
    assert status == 503 and body["dataplane"] == "stopped" and body["status"] == "down"


async def test_memory_held_for_connections_is_given_back_when_they_close(registry, tmp_path):
    # A sidecar process of its own, so its RSS is what an operator would see.
    config = tmp_path / "sidecar.yaml"
    config.write_text("listeners: {max_connections: 5000}\n")
    proc = await asyncio.create_subprocess_exec(
        *SHOAL,
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        registry.address,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        address = line.split(" serving on ")[1].split()[0]
        sidecar = psutil.Process(proc.pid)

        def rss_mib() -> float:
            return float(sidecar.memory_info().rss) / 2**20

        def crowd(n: int) -> float:
            held = [RawH2(address) for _ in range(n)]
            try:
                for raw in held:
                    raw.settings()
                return rss_mib()
            finally:
                for raw in held:
                    raw.close()

        base = rss_mib()
        crowded = await asyncio.to_thread(crowd, 2000)
        # 2,000 connections take tens of MiB (about 15 KiB each): enough to see them go.
        assert crowded - base > 15, (base, crowded)
        await wait_for(lambda: sidecar.num_fds() < 100, what="the connections to close")
        await wait_for(
            lambda: rss_mib() - base < 0.25 * (crowded - base),
            what=f"memory to come back (base {base:.1f} MiB, crowded {crowded:.1f})",
        )
    finally:
        proc.terminate()
        await proc.wait()
