"""The sidecar's own services, served by its data plane, and a process that loads no grpcio.

Checked with grpcio's own clients, as an app (or grpcurl) would call them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha import reflection_pb2_grpc as rpb_grpc

from proxy_sidecar import SidecarServer
from tests.proxy_sidecar.conftest import sidecar_config, wait_for
from tests.proxy_sidecar.test_cli import SHOAL

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


async def test_its_health_says_serving_and_not_serving_once_it_drains(registry):
    sidecar = SidecarServer("127.0.0.1:0", registry.address, sidecar_config())
    await sidecar.start()
    closing: asyncio.Task[None] | None = None
    channel: Any
    try:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            listed = await stub.List(health_pb2.HealthListRequest(), timeout=10)
            assert {name: s.status for name, s in listed.statuses.items()} == {"": SERVING}
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
            assert (await unknown.read()).status == SERVICE_UNKNOWN
            unknown.cancel()
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert (await watch.read()).status == SERVING
            # Draining: watchers hear NOT_SERVING at once (the calls under way get the grace).
            closing = asyncio.create_task(sidecar.close(grace=5.0))
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
    finally:
        if closing is None:
            await sidecar.close(0)
        else:
            await closing


async def test_reflection_lists_its_own_services_and_gives_their_files(registry):
    sidecar = SidecarServer("127.0.0.1:0", registry.address, sidecar_config())
    channel: Any
    async with sidecar, grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = rpb_grpc.ServerReflectionStub(channel)
        requests = [
            rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
            rpb.ServerReflectionRequest(file_by_filename=health_pb2.DESCRIPTOR.name),
            rpb.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
            rpb.ServerReflectionRequest(all_extension_numbers_of_type="x.Y"),
        ]
        replies = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    assert len(replies) == len(requests)
    names = [s.name for s in replies[0].list_services_response.service]
    assert names == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    for found in replies[1:3]:
        (file,) = found.file_descriptor_response.file_descriptor_proto
        assert file == health_pb2.DESCRIPTOR.serialized_pb
    assert replies[3].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert replies[4].error_response.error_code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    # Each reply names the request it answers, as reflection clients expect.
    assert [r.original_request for r in replies] == requests


async def test_a_sidecar_process_loads_no_grpcio_and_runs_two_threads(registry, upstreams):
    # The registry's Watch and the app's health checks travel on the data plane, and its
    # own services are the data plane's: grpcio (14 MiB, threads of its own) stays out.
    proc = await asyncio.create_subprocess_exec(
        *SHOAL,
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--registry",
        registry.address,
        "--service",
        "echo",
        "--app",
        upstreams[0].address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "serving on" in line, line
        # Registered (through the data plane) and heartbeating.
        await wait_for(lambda: len(registry.store.instances()) == 1, what="registration")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "cygrpc" not in maps
        threads = sorted(p.name for p in Path(f"/proc/{proc.pid}/task").iterdir())
        assert len(threads) == 2, threads
    finally:
        proc.terminate()
        await proc.wait()
