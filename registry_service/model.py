"""The registry's domain values: what an instance is and what it reports."""

from __future__ import annotations

import enum
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "DEFAULT_WEIGHT",
    "Event",
    "EventKind",
    "Instance",
    "InstanceSpec",
    "LoadReport",
    "ServiceSummary",
    "ServingStatus",
]

DEFAULT_WEIGHT = 100


class ServingStatus(enum.IntEnum):
    """What an instance says of itself; numbered as on the wire."""

    SERVING = 1
    NOT_SERVING = 2
    DRAINING = 3


@dataclass(frozen=True, slots=True)
class LoadReport:
    """The load an instance reports with each heartbeat."""

    in_flight: int = 0
    queue_depth: int = 0
    cpu_percent: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What a caller registers; fixed for the life of a lease."""

    instance_id: str
    service: str
    address: str
    grpc_services: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    weight: int = DEFAULT_WEIGHT
    zone: str = ""

    def retained_bytes(self) -> int:
        """What keeping this spec alive costs: ``sys.getsizeof`` of it, its strings and
        containers (metadata keys and values included). Small ints and the allocator's
        own overhead are not counted; measured RSS runs about 10 % above this."""
        size = sys.getsizeof
        total = size(self) + size(self.grpc_services) + size(self.metadata)
        if isinstance(self.metadata, MappingProxyType):
            total += size(dict(self.metadata))  # the dict the proxy wraps, of the same size
        total += sum(size(s) for s in (self.instance_id, self.service, self.address, self.zone))
        total += sum(size(s) for s in self.grpc_services)
        return total + sum(size(k) + size(v) for k, v in self.metadata.items())


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance as watchers see it; replaced, never mutated, on change."""

    spec: InstanceSpec
    lease_id: str
    ttl: float
    status: ServingStatus = ServingStatus.SERVING
    load: LoadReport = LoadReport()
    # False once the lease lapsed: the first stage of expiry, before removal.
    lease_ok: bool = True
    revision: int = 0

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id

    @property
    def healthy(self) -> bool:
        """Routable: the lease is live and the instance says it is serving."""
        return self.lease_ok and self.status is ServingStatus.SERVING


class EventKind(enum.Enum):
    UPSERT = "upsert"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class Event:
    """A change to one instance, at the registry revision it produced."""

    kind: EventKind
    revision: int
    instance: Instance


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    """A service as listings show it: its instances, how many are healthy, and the
    gRPC services they say they serve."""

    name: str
    instances: int
    healthy: int
    grpc_services: tuple[str, ...]
