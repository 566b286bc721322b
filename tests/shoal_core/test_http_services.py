"""The services' pages: ``/metrics`` and ``/healthz`` of the registry and the worker."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.worker_pb2 import CallRequest
from protos.worker_pb2_grpc import WorkerStub
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


class CountingWorker(WorkerServer):
    """A worker that counts how often what it owns is released."""

    releases = 0

    async def _after_stop(self) -> None:
        self.releases += 1
        await super()._after_stop()


async def test_a_worker_whose_metrics_port_is_taken_releases_its_pools_once() -> None:
    async with WorkerServer("127.0.0.1:0", metrics_listen="127.0.0.1:0") as first:
        second = CountingWorker("127.0.0.1:0", metrics_listen=f"127.0.0.1:{first.metrics_port}")
        with pytest.raises(ServerStartError, match="address already in use"):
            await second.start()
        await asyncio.wait_for(second.wait_closed(), 5)
        assert second.releases == 1


async def test_healthz_says_what_grpc_health_says_and_fails_once_draining() -> None:
    server = WorkerServer("127.0.0.1:0", metrics_listen="127.0.0.1:0")
    await server.start()
    try:
        port = server.metrics_port
        status, headers, body = await request(port, "GET", "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "serving"})
        assert headers[b"content-type"] == b"application/json"
        async with grpc.aio.insecure_channel(server.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Draining: a call still running holds the close open while the page is read.
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = WorkerStub(channel).Call(CallRequest(function="sleep", payload=b"1.5"))
            running = asyncio.ensure_future(call)
            await asyncio.sleep(0.3)
            closing = asyncio.ensure_future(server.close(grace=5.0))
            await asyncio.sleep(0.3)
            status, _, body = await request(port, "GET", "/healthz")
            assert (status, json.loads(body)) == (503, {"status": "draining"})
            await running
    finally:
        await server.close(grace=0)
    await closing
