"""The services' pages: ``--metrics`` of the registry and the worker, on their own loops."""

from __future__ import annotations

import asyncio

import pytest

from registry_service import RegistryServer
from shoal_core.grpc_server import ServerStartError
from tests.shoal_core.test_http import ended_by_server, request
from worker_node import WorkerServer


async def test_the_registry_serves_metrics_and_its_close_ends_their_connections() -> None:
    server = RegistryServer("127.0.0.1:0", metrics_listen="127.0.0.1:0")
    await server.start()
    try:
        port = server.metrics_port
        status, headers, body = await request(port, "GET", "/metrics")
        assert status == 200 and headers[b"content-type"].startswith(b"text/plain")
        assert b"shoal_registry_instances 0.0" in body
        idle = await asyncio.open_connection("127.0.0.1", port)
    finally:
        await server.close(grace=0.5)
    assert await ended_by_server(idle[0], timeout=5.0) is not None
    idle[1].close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_the_worker_serves_metrics() -> None:
    async with WorkerServer("127.0.0.1:0", metrics_listen="127.0.0.1:0") as server:
        status, _, body = await request(server.metrics_port, "GET", "/metrics")
        assert status == 200 and b"shoal_worker_uptime_seconds" in body
        assert (await request(server.metrics_port, "GET", "/"))[0] == 404
    assert server.metrics_port != 0


async def test_a_taken_metrics_port_fails_the_start_and_leaves_nothing_running() -> None:
    async with RegistryServer("127.0.0.1:0", metrics_listen="127.0.0.1:0") as first:
        second = RegistryServer("127.0.0.1:0", metrics_listen=f"127.0.0.1:{first.metrics_port}")
        with pytest.raises(ServerStartError, match="cannot listen on .*address already in use"):
            await second.start()
        await asyncio.wait_for(second.wait_closed(), 5)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", second.port)
