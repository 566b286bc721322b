"""Registry fixtures: a real server on 127.0.0.1:0 and a stub talking to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from registry_service.backend import MemoryBackend
from registry_service.store import RegistryStore

# Short leases so expiry tests take a second or two, not ten.
FAST = RegistryConfig(
    ttl_default=1.0,
    ttl_min=0.2,
    ttl_max=30.0,
    sweep_interval=0.1,
    removal_grace=0.5,
    watch_progress_interval=0.3,
    preservation_share=1.0,  # 1.0 never triggers; preservation has its own tests
)

StartRegistry = Callable[..., Awaitable[RegistryServer]]


@pytest.fixture
async def start_registry() -> AsyncIterator[StartRegistry]:
    servers: list[RegistryServer] = []

    async def start(
        config: RegistryConfig = FAST,
        listen: str = "127.0.0.1:0",
        metrics_listen: str | None = None,
    ) -> RegistryServer:
        server = RegistryServer(listen, config, metrics_listen=metrics_listen)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close(grace=0.5)


@pytest.fixture
async def registry(start_registry: StartRegistry) -> RegistryServer:
    return await start_registry()


@pytest.fixture
async def channel(registry: RegistryServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(registry.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.RegistryAsyncStub:
    return pb_grpc.RegistryStub(channel)


class Clock:
    """A hand-driven clock for the store's timing rules (pure logic, so a fake is fine)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def read(call: Any, timeout: float = 5.0) -> pb.WatchEvent:
    """The next message of a watch stream; fails if the stream ends or stalls."""
    event = await asyncio.wait_for(call.read(), timeout)
    assert isinstance(event, pb.WatchEvent), "watch stream ended"
    return event


def instance(n: int = 1, service: str = "echo", **fields: object) -> pb.Instance:
    """A valid instance message; ``fields`` override any field."""
    values: dict[str, object] = {
        "instance_id": f"{service}-{n}",
        "service": service,
        "address": f"127.0.0.1:{10_000 + n}",
        "grpc_services": ["test.Echo"],
    }
    values.update(fields)
    return pb.Instance(**values)  # type: ignore[arg-type]


def memory_store(server: RegistryServer) -> RegistryStore:
    """The in-memory store behind ``server``, for tests that change it directly: with no
    await between changes, a watch stream cannot drain in between."""
    backend = server.backend
    assert isinstance(backend, MemoryBackend)
    return backend.store
