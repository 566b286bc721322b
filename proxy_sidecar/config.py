"""The sidecar's settings: a YAML file validated on load, and the same models in code.

Everything has a default, so a sidecar runs with no file. Example::

    lb: round_robin                  # default balancer for every service
    services:
      shoal.worker.v1.Worker:        # per gRPC service
        lb: consistent_hash
        hash_key: x-cache-key        # metadata key whose value picks the instance
        per_try_timeout: 2.0
        retry: {max_attempts: 3, retry_on: [RESOURCE_EXHAUSTED], idempotent_methods: [Echo]}
        circuit_breaker: {max_in_flight: 500, max_pending: 100}
    outlier: {consecutive_failures: 5, base_ejection: 30}
    discovery: {empty_set_hold: 10}
    membership: {ttl: 10, grpc_services: [shoal.worker.v1.Worker], weight: 100}
    listeners: {max_connections: 1024, max_streams: 1000, idle_timeout: 600}
"""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
from pydantic import Field

from shoal_core.codes import CODE_NAMES
from shoal_core.config import StrictModel, load_yaml

__all__ = [
    "BreakerSettings",
    "DiscoverySettings",
    "ListenerSettings",
    "MembershipSettings",
    "OutlierSettings",
    "PoolSettings",
    "RetrySettings",
    "ServicePolicy",
    "SidecarConfig",
    "CODE_NAMES",
    "STATUS_CODE_NAMES",
    "load_config",
]

STATUS_CODE_NAMES = frozenset(CODE_NAMES)
_GRPC_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")


class RetrySettings(StrictModel):
    """Retries on another instance. UNAVAILABLE is always retried; ``retry_on`` codes and
    per-try timeouts only for methods named in ``idempotent_methods`` ("*" for all)."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    retry_on: tuple[str, ...] = ()
    idempotent_methods: tuple[str, ...] = ()
    backoff_base: float = Field(default=0.025, gt=0.0, le=60.0)
    backoff_max: float = Field(default=0.25, gt=0.0, le=600.0)
    budget_percent: float = Field(default=20.0, ge=0.0, le=1000.0)
    budget_min_per_second: float = Field(default=10.0, ge=0.0, le=100_000.0)

    @pydantic.field_validator("retry_on")
    @classmethod
    def _codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            if code not in STATUS_CODE_NAMES or code == "OK":
                raise ValueError(f"{code!r} is not a gRPC status code name such as UNAVAILABLE")
        return value

    @pydantic.model_validator(mode="after")
    def _pauses(self) -> RetrySettings:
        if self.backoff_max < self.backoff_base:
            raise ValueError(
                f"backoff_max ({self.backoff_max}) must not be below backoff_base "
                f"({self.backoff_base})"
            )
        return self

    def is_idempotent(self, method: str) -> bool:
        return "*" in self.idempotent_methods or method in self.idempotent_methods


class BreakerSettings(StrictModel):
    """Circuit breaker of one upstream service."""

    max_in_flight: int = Field(default=1000, ge=1, le=1_000_000)
    max_pending: int = Field(default=1000, ge=0, le=1_000_000)


class OutlierSettings(StrictModel):
    """Ejection of failing endpoints; the panic threshold is a share of the set, in %."""

    consecutive_failures: int = Field(default=5, ge=1, le=1000)
    base_ejection: float = Field(default=30.0, gt=0.0, le=86_400.0)
    max_ejection: float = Field(default=300.0, gt=0.0, le=86_400.0)
    max_ejected_percent: float = Field(default=50.0, ge=0.0, le=100.0)
    panic_threshold: float = Field(default=50.0, ge=0.0, le=100.0)


class ServicePolicy(StrictModel):
    """How calls to one gRPC service are balanced, retried and bounded."""

    lb: str | None = None
    hash_key: str = "shoal-hash-key"
    per_try_timeout: float | None = Field(default=None, gt=0.0, le=86_400.0)
    retry: RetrySettings = RetrySettings()
    circuit_breaker: BreakerSettings = BreakerSettings()

    @pydantic.field_validator("hash_key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _METADATA_KEY.fullmatch(value) or value.endswith("-bin"):
            raise ValueError(f"{value!r} is not a lower-case text metadata key")
        return value


class DiscoverySettings(StrictModel):
    """The registry watch: reconnect pacing and the empty-set guard."""

    backoff_initial: float = Field(default=0.2, gt=0.0, le=60.0)
    backoff_max: float = Field(default=5.0, gt=0.0, le=600.0)
    empty_set_hold: float = Field(default=10.0, ge=0.0, le=3600.0)
    # How long start-up waits for the first snapshot before serving anyway.
    initial_sync: float = Field(default=3.0, ge=0.0, le=600.0)

    @pydantic.model_validator(mode="after")
    def _pauses(self) -> DiscoverySettings:
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"backoff_max ({self.backoff_max}) must not be below backoff_initial "
                f"({self.backoff_initial})"
            )
        return self


class PoolSettings(StrictModel):
    """Upstream connections: closed after ``idle_timeout`` seconds without calls.

    Forwarded calls are never decoded, so their message limits are those of the app and
    of the upstream, which answer RESOURCE_EXHAUSTED themselves.
    """

    idle_timeout: float = Field(default=300.0, gt=0.0, le=86_400.0)


class ListenerSettings(StrictModel):
    """What a caller can make the sidecar hold, for each of its listeners.

    Past ``max_connections`` a new connection is closed at once; a connection may have
    ``max_streams`` calls open (HTTP/2's MAX_CONCURRENT_STREAMS; a gRPC client queues
    beyond it); a connection with no call for ``idle_timeout`` seconds gets GOAWAY and
    is closed. The idle timeout is longer than ``pool.idle_timeout``, so the sidecars
    calling this one let their connections go first.
    """

    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    max_streams: int = Field(default=1000, ge=1, le=100_000)
    idle_timeout: float = Field(default=600.0, gt=0.0, le=86_400.0)


class MembershipSettings(StrictModel):
    """How the co-located app is registered (used with --service/--app)."""

    ttl: float = Field(default=10.0, ge=1.0, le=3600.0)
    grpc_services: tuple[str, ...] = ()
    instance_id: str | None = None
    weight: int = Field(default=0, ge=0, le=10_000)
    zone: str = ""
    metadata: dict[str, str] = {}
    health_service: str = ""

    @pydantic.field_validator("grpc_services")
    @classmethod
    def _services(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _GRPC_SERVICE.fullmatch(name):
                raise ValueError(f"{name!r} is not a gRPC service name like pkg.Service")
        return value


class SidecarConfig(StrictModel):
    """Everything a sidecar can be told beyond its command-line addresses."""

    lb: str = "round_robin"
    services: dict[str, ServicePolicy] = {}
    defaults: ServicePolicy = ServicePolicy()
    outlier: OutlierSettings = OutlierSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    pool: PoolSettings = PoolSettings()
    listeners: ListenerSettings = ListenerSettings()
    membership: MembershipSettings = MembershipSettings()

    def policy(self, service: str) -> ServicePolicy:
        return self.services.get(service, self.defaults)

    def balancer_name(self, service: str) -> str:
        return self.policy(service).lb or self.lb


def load_config(path: str | Path | None) -> SidecarConfig:
    """The file's settings, or the defaults without a file; ``ConfigError`` names the field."""
    return SidecarConfig() if path is None else load_yaml(path, SidecarConfig)
