"""Fixtures for the sidecar tests: a real registry, upstreams with sidecars, a client sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import psutil
import pytest

from proxy_sidecar import SidecarConfig, SidecarServer
from registry_service import RegistryConfig, RegistryServer
from tests.proxy_sidecar.upstream import SERVICE, Upstream

FAST_REGISTRY = RegistryConfig(
    ttl_default=1.5,
    ttl_min=0.5,
    sweep_interval=0.2,
    removal_grace=1.0,
    watch_progress_interval=1.0,
)


def sidecar_config(**sections: object) -> SidecarConfig:
    """Test settings: short leases and holds, quick reconnects; ``sections`` override."""
    base: dict[str, object] = {
        "discovery": {"backoff_initial": 0.05, "backoff_max": 0.5, "empty_set_hold": 2.0},
        "membership": {"ttl": 1.5, "grpc_services": [SERVICE, "test.Other"]},
        "outlier": {"base_ejection": 1.0},
    }
    base.update(sections)
    return SidecarConfig.model_validate(base)


async def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; generous deadlines keep loaded machines green."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)


async def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """A sidecar admin page's ``/healthz``: its HTTP status and its JSON body."""

    def fetch() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as page:
                return page.status, json.load(page)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    return await asyncio.to_thread(fetch)


def routable(sidecar: SidecarServer, service: str = SERVICE) -> int:
    return sum(1 for e in sidecar.table.members(service) or () if e.reachable)


class Echo:
    """Raw-bytes callables for the four shapes of ``test.Echo`` on a channel."""

    def __init__(self, channel: Any) -> None:
        self.unary = channel.unary_unary(f"/{SERVICE}/Unary")
        self.server_stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        self.client_stream = channel.stream_unary(f"/{SERVICE}/ClientStream")
        self.bidi = channel.stream_stream(f"/{SERVICE}/Bidi")


async def served_by(call: Any) -> str:
    initial = await call.initial_metadata()
    return str(dict(initial)["x-served-by"])


class Mesh:
    """A registry, ``n`` upstreams each behind a registering sidecar, and a client sidecar."""

    def __init__(self, registry: RegistryServer, upstreams: list[Upstream]) -> None:
        self.registry = registry
        self.upstreams = upstreams
        self.sidecars: list[SidecarServer] = []
        self.client: SidecarServer | None = None
        self.channel: grpc.aio.Channel | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def echo(self) -> Echo:
        assert self.channel is not None
        return Echo(self.channel)

    def by_name(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    async def add_sidecar(self, upstream: Upstream, config: SidecarConfig) -> SidecarServer:
        sidecar = SidecarServer(
            "127.0.0.1:0",
            self.registry.address,
            config,
            service="echo",
            app=upstream.address,
            inbound="127.0.0.1:0",
        )
        await self._stack.enter_async_context(sidecar)
        self.sidecars.append(sidecar)
        return sidecar

    async def start(self, client_config: SidecarConfig, *, admin: bool = False) -> Mesh:
        for upstream in self.upstreams:
            await self.add_sidecar(upstream, sidecar_config())
        self.client = SidecarServer(
            "127.0.0.1:0",
            self.registry.address,
            client_config,
            admin="127.0.0.1:0" if admin else None,
        )
        await self._stack.enter_async_context(self.client)
        self.channel = await self._stack.enter_async_context(
            grpc.aio.insecure_channel(self.client.address)
        )
        client = self.client
        await wait_for(
            lambda: routable(client) == len(self.upstreams),
            what="all upstreams routable",
        )
        return self

    async def close(self) -> None:
        await self._stack.aclose()


@pytest.fixture
async def registry() -> AsyncIterator[RegistryServer]:
    async with RegistryServer("127.0.0.1:0", FAST_REGISTRY) as server:
        yield server


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstream]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Upstream(f"up{i}")) for i in range(3)]


@pytest.fixture
async def make_mesh(
    registry: RegistryServer, upstreams: list[Upstream]
) -> AsyncIterator[Callable[..., Awaitable[Mesh]]]:
    meshes: list[Mesh] = []

    async def make(client_config: SidecarConfig | None = None, **kwargs: bool) -> Mesh:
        mesh = Mesh(registry, upstreams)
        meshes.append(mesh)
        return await mesh.start(client_config or sidecar_config(), **kwargs)

    yield make
    for mesh in meshes:
        await mesh.close()


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Every test must reap what it started: no child process may outlive it."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"child processes left behind: {left}"
