"""Registry fixtures: a real server on 127.0.0.1:0 and a stub talking to it, on each
backend.

Everything built on ``start_registry`` (and so ``registry``, ``channel``, ``stub``) runs
once per backend, with ids ``[memory]`` and ``[etcd]``: the in-process store, and
``EtcdBackend`` on one 3-member etcd cluster shared by the whole session (started when
the first etcd test needs it, reaped at the end), each registry server under a key
prefix of its own and with an ``EtcdClient`` of its own, closed after it. Settings
etcd cannot honour (leases under a second: etcd's are whole seconds, at least one) are
raised for the etcd variant by ``fit``; a test that needs a lease as short as the
backend allows takes ``short_ttl``. A test that cannot apply to etcd is marked
``@memory_only("why")``: its ``[etcd]`` variant is skipped with that reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from registry_service.backend import Backend, MemoryBackend
from registry_service.etcd import EtcdClient
from registry_service.etcd_store import EtcdBackend
from registry_service.store import RegistryStore
from registry_service.xds.policy import XdsPolicies
from tests.etcd_cluster import ETCD, MISSING, EtcdCluster, requires_etcd

MEMORY, ETCD_BACKEND = "memory", "etcd"
BACKENDS = [MEMORY, pytest.param(ETCD_BACKEND, marks=requires_etcd)]
# The shortest lease each backend grants: etcd counts leases in whole seconds.
SHORTEST_TTL = {MEMORY: 0.2, ETCD_BACKEND: 1.0}
ETCD_DEFAULT_TTL = 5.0

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


def memory_only(reason: str) -> pytest.MarkDecorator:
    """Run a test on the memory backend only; its ``[etcd]`` variant is skipped with
    ``reason``."""
    return pytest.mark.memory_only(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "memory_only(reason): the test's [etcd] variant is skipped with reason"
    )


def fit(config: RegistryConfig, backend: str) -> RegistryConfig:
    """``config`` as ``backend`` can honour it. On etcd: no lease under a second, and a
    default lease long enough to outlive a test's writes (each a raft round on a 3-member
    cluster, so slow on a loaded machine); a test that wants a lease to lapse asks for
    its TTL."""
    if backend == MEMORY:
        return config
    ttl_min = max(config.ttl_min, SHORTEST_TTL[backend])
    ttl_default = max(config.ttl_default, ETCD_DEFAULT_TTL)
    if (ttl_min, ttl_default) == (config.ttl_min, config.ttl_default):
        return config
    return replace(config, ttl_min=ttl_min, ttl_default=min(ttl_default, config.ttl_max))


# Package-scoped: gone once this package's tests are, so the leak checks of the tests
# that run after it (they look for any child process) do not find its members.
@pytest.fixture(scope="package")
def registry_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One 3-member etcd for every registry test of the session; tests must not stop
    its members. Plain subprocesses, so it outlives each test's event loop."""
    if ETCD is None:
        pytest.skip(MISSING)
    cluster = EtcdCluster(tmp_path_factory.mktemp("registry-etcd"), members=3)
    # On a loop of its own, in a thread of its own: the test's loop is left alone.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, cluster.__aenter__()).result()
    try:
        yield cluster
    finally:
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, cluster.__aexit__(None, None, None)).result()


# Session-scoped, so that pytest runs every [memory] variant, then every [etcd] one, and
# the cluster is up before any test begins (and before its check for leftover children).
@pytest.fixture(scope="package", params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == ETCD_BACKEND:
        request.getfixturevalue("registry_etcd")
    return kind


@pytest.fixture
def backend(backend_kind: str, request: pytest.FixtureRequest) -> str:
    """Which backend the registry servers of this test run on: ``memory`` or ``etcd``."""
    marker = request.node.get_closest_marker("memory_only")
    if backend_kind != MEMORY and marker is not None:
        pytest.skip(f"memory backend only: {marker.args[0]}")
    return backend_kind


@pytest.fixture
def short_ttl(backend: str) -> float:
    """The shortest lease, in seconds, the backend under test grants."""
    return SHORTEST_TTL[backend]


MakeBackend = Callable[[RegistryConfig], Backend]


@pytest.fixture
async def make_backend(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[MakeBackend]:
    """Makes the backend for one registry server (which starts and closes it); on etcd
    under a fresh prefix, with its own client, closed at the end of the test."""
    clients: list[EtcdClient] = []

    def make(config: RegistryConfig) -> Backend:
        if backend == MEMORY:
            return MemoryBackend(config)
        cluster: EtcdCluster = request.getfixturevalue("registry_etcd")  # up already
        client = EtcdClient(cluster.endpoints, timeout=2.0)
        clients.append(client)
        prefix = f"/test/registry/{uuid.uuid4().hex}/".encode()
        return EtcdBackend(config, client, prefix=prefix, start_timeout=5.0)

    yield make
    for client in clients:
        await client.aclose()


class StartRegistry:
    """Starts registry servers on the backend under test; ``close_all`` closes them."""

    def __init__(self, backend: str, make_backend: MakeBackend) -> None:
        self.backend = backend
        self._make_backend = make_backend
        self.servers: list[RegistryServer] = []

    async def __call__(
        self,
        config: RegistryConfig = FAST,
        listen: str = "127.0.0.1:0",
        metrics_listen: str | None = None,
        xds_policies: XdsPolicies | None = None,
    ) -> RegistryServer:
        config = fit(config, self.backend)
        server = RegistryServer(
            listen,
            config,
            metrics_listen=metrics_listen,
            backend=self._make_backend(config),
            xds_policies=xds_policies,
        )
        await server.start()
        self.servers.append(server)
        return server

    async def close_all(self) -> None:
        for server in self.servers:
            await server.close(grace=0.5)


@pytest.fixture
async def start_registry(backend: str, make_backend: MakeBackend) -> AsyncIterator[StartRegistry]:
    start = StartRegistry(backend, make_backend)
    yield start
    await start.close_all()


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
