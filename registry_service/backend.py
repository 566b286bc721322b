"""Where the registry's state lives: one interface, and the in-memory backend.

The servicer reads from a ``RegistryView`` and changes the state through a ``Backend``.
Reads are always served from this process's memory: the memory backend's store is the
state itself; an etcd backend's view is a mirror of etcd, fed by a watch, so every
replica answers reads alone and with the revisions etcd gave. Writes are coroutines: a
memory write is done when it returns, an etcd write once etcd has it.

``MemoryBackend`` is the default (``shoal up``, tests, a single registry): today's
``RegistryStore`` and the task that sweeps it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from registry_service.config import RegistryConfig
from registry_service.history import Replay
from registry_service.model import (
    Event,
    Instance,
    InstanceSpec,
    LoadReport,
    ServiceSummary,
    ServingStatus,
)
from registry_service.store import RegistryStore, StoreStats
from shoal_core.lifecycle import stop_task

__all__ = ["Backend", "MemoryBackend", "PreservationView", "RegistryView"]

logger = logging.getLogger(__name__)


class PreservationView(Protocol):
    """Whether evictions are held (self-preservation), and since when."""

    @property
    def active(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def entered_total(self) -> int: ...
    def seconds_active(self, now: float) -> float: ...


class RegistryView(Protocol):
    """What the servicer reads: instances, their revisions and history, the state."""

    config: RegistryConfig
    epoch: str
    stats: StoreStats

    @property
    def instances_bytes(self) -> int: ...

    @property
    def preservation(self) -> PreservationView: ...
    @property
    def revision(self) -> int: ...
    def now(self) -> float: ...
    def __len__(self) -> int: ...
    def get(self, instance_id: str) -> Instance | None: ...
    def service_of_lease(self, lease_id: str) -> str | None: ...
    def lease_age(self, instance_id: str) -> float: ...
    def instances(self, service: str = "") -> list[Instance]: ...
    def discover(
        self, service: str, grpc_service: str, include_unhealthy: bool
    ) -> list[Instance]: ...
    def grpc_owners(self, grpc_service: str) -> set[str]: ...
    def address_owners(self, address: str) -> set[str]: ...
    def events_since(self, revision: int, service: str = "") -> Replay | None: ...
    def services(self) -> list[ServiceSummary]: ...
    def subscribe(self, listener: Callable[[Event], None]) -> None: ...


class Backend(Protocol):
    """The registry's state: read through ``view``, changed by the coroutines."""

    @property
    def view(self) -> RegistryView: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def register(
        self, spec: InstanceSpec, ttl_requested: float, status: ServingStatus
    ) -> Instance: ...
    async def heartbeat(
        self, lease_id: str, status: ServingStatus, load: LoadReport
    ) -> Instance: ...
    async def deregister(self, lease_id: str) -> None: ...


class MemoryBackend:
    """The state in this process, swept every ``config.sweep_interval``: the default."""

    def __init__(
        self, config: RegistryConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = RegistryStore(config, clock=clock)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def view(self) -> RegistryStore:
        return self.store

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="registry-sweeper")

    async def close(self) -> None:
        await stop_task(self._sweeper)
        self._sweeper = None

    async def register(
        self, spec: InstanceSpec, ttl_requested: float, status: ServingStatus
    ) -> Instance:
        return self.store.register(spec, ttl_requested, status)

    async def heartbeat(self, lease_id: str, status: ServingStatus, load: LoadReport) -> Instance:
        return self.store.heartbeat(lease_id, status, load)

    async def deregister(self, lease_id: str) -> None:
        self.store.deregister(lease_id)

    async def _sweep_forever(self) -> None:
        interval = self.store.config.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.store.sweep()
            except Exception:  # a sweep bug must not stop expiry for good
                logger.exception("registry sweep failed")
