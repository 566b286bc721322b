"""Bad input and the admin endpoint: the sidecar answers clearly and stays up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from proxy_sidecar import SidecarServer
from tests.proxy_sidecar.conftest import Mesh, sidecar_config, wait_for


async def _get(port, path):
    def fetch():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read()

    return await asyncio.to_thread(fetch)


async def test_garbage_and_bad_calls_do_not_hurt(make_mesh):
    mesh = await make_mesh()
    host, port = mesh.client.address.rsplit(":", 1)
    for junk in (
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff" * 9,
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(junk)
        await writer.drain()
        # The sidecar answers with a GOAWAY or an HTTP error and closes; closing with
        # our junk unread resets the connection, which is as good an answer.
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(1024), 10)
            writer.close()
            await writer.wait_closed()
    assert mesh.channel is not None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.channel.unary_unary("/no-service-here")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Not even a valid HTTP/2 path: the stream is reset (PROTOCOL_ERROR, which gRPC
    # calls INTERNAL), and the connection goes on serving.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.channel.unary_unary("/bad path")(b"")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.echo.unary(b"x" * (5 * 1024 * 1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A client that vanishes mid-stream.
    channel: Any = grpc.aio.insecure_channel(mesh.client.address)
    call = channel.stream_stream("/test.Echo/Bidi")()
    await call.write(b"a")
    await call.read()
    await channel.close()
    assert (await mesh.echo.unary(b"still")).endswith(b":still")


async def test_no_healthy_instance_is_unavailable(make_mesh):
    mesh = await make_mesh()
    for sidecar in mesh.sidecars:
        await sidecar.close(0)

    async def unavailable():
        try:
            await mesh.echo.unary(b"x", timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    await wait_for(unavailable, what="UNAVAILABLE once every instance is gone")


async def test_admin_endpoints(make_mesh):
    mesh = await make_mesh(admin=True)
    for i in range(5):
        await mesh.echo.unary(b"%d" % i)
    port = mesh.client.admin_port
    status, body = await _get(port, "/healthz")
    assert status == 200 and json.loads(body)["registry_connected"] is True
    status, body = await _get(port, "/endpoints")
    data = json.loads(body)["services"]["test.Echo"]
    assert data["lb"] == "round_robin" and len(data["endpoints"]) == 3
    assert {"state", "in_flight", "ewma_ms", "ejected"} <= set(data["endpoints"][0])
    assert data["codes"]["OK"] == 5
    status, body = await _get(port, "/metrics")
    assert (
        b'shoal_sidecar_requests_total{caller="unknown",code="OK",direction="outbound",'
        b'method="Unary",'
        b'service="test.Echo"} 5.0'
    ) in body


def test_bad_settings_are_refused(registry):
    from proxy_sidecar.errors import PolicyError

    with pytest.raises(PolicyError, match="unknown load balancer"):
        SidecarServer("127.0.0.1:0", registry.address, sidecar_config(lb="fastest"))
    with pytest.raises(PolicyError, match="go together"):
        SidecarServer("127.0.0.1:0", registry.address, service="echo")


def _dataplane_threads() -> int:
    tasks = Path("/proc/self/task")
    return sum(1 for t in tasks.iterdir() if (t / "comm").read_text().strip() == "shoal-dataplane")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in Linux /proc")
async def test_connections_open_ahead_close_when_idle_and_the_thread_ends(registry, upstreams):
    before = _dataplane_threads()
    mesh = await Mesh(registry, upstreams).start(sidecar_config(pool={"idle_timeout": 0.6}))
    try:
        client = mesh.client
        dataplane = client.dataplane if client else None
        assert client is not None and dataplane is not None

        def states() -> list[str]:
            return sorted(e.state for e in client.table.endpoints())

        # Opened when the endpoints appeared, before any call.
        await wait_for(lambda: states() == ["READY"] * 3, what="3 connections opened ahead")
        # The sidecar's own connection to the registry (its watch) counts too, until idle.
        assert dataplane.connections() >= 3
        await wait_for(lambda: states() == ["IDLE"] * 3, what="idle connections closed")
        await wait_for(lambda: dataplane.connections() == 0, what="no connection counted")
        assert (await mesh.echo.unary(b"again")).endswith(b":again")
        assert dataplane.connections() >= 1
        assert _dataplane_threads() == before + 4
    finally:
        await mesh.close()
    assert _dataplane_threads() == before
