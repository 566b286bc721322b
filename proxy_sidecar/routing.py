"""From a call's method path and metadata to the cluster that serves it (no gRPC).

Outgoing calls route by the gRPC service in the path (``/pkg.Service/Method``)
to the instances that declared it at registration; the ``shoal-target-service``
metadata key overrides the service. Calls marked with ``shoal-hop`` come from
another sidecar and go to this sidecar's own app.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy_sidecar.balancers import make_balancer
from proxy_sidecar.cluster import Cluster
from proxy_sidecar.config import (
    OutlierSettings,
    RetrySettings,
    ServicePolicy,
    SidecarConfig,
)
from proxy_sidecar.endpoints import EndpointTable, InstanceInfo
from proxy_sidecar.errors import UnknownService
from proxy_sidecar.resilience import no_counts

__all__ = [
    "HOP_KEY",
    "LOCAL_SERVICE",
    "TARGET_KEY",
    "UPSTREAM_KEY",
    "Route",
    "Router",
    "parse_method",
]

TARGET_KEY = "shoal-target-service"
HOP_KEY = "shoal-hop"
# Trailing metadata naming the instance that served a call, added by the caller's sidecar.
UPSTREAM_KEY = "shoal-upstream"
LOCAL_SERVICE = "local-app"

_METHOD = re.compile(r"/([A-Za-z_][A-Za-z0-9_.]*)/([A-Za-z_][A-Za-z0-9_]*)")
_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True, slots=True)
class Route:
    """What the path of a call says: the full path, its gRPC service and method."""

    path: str
    service: str
    method: str


def parse_method(path: str) -> Route | None:
    """``/pkg.Service/Method`` into its parts; ``None`` when it is not a gRPC path."""
    match = _METHOD.fullmatch(path)
    if match is None or len(path) > 1024:
        return None
    return Route(path, match.group(1), match.group(2))


def valid_service(name: str) -> bool:
    return len(name) <= 256 and _SERVICE.fullmatch(name) is not None


class Router:
    """Finds or creates the cluster of a gRPC service; holds the local app's cluster."""

    def __init__(
        self,
        table: EndpointTable,
        config: SidecarConfig,
        *,
        app: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        breaker_counts: Callable[[str], tuple[int, int, int]] = no_counts,
    ) -> None:
        self._table = table
        self._config = config
        self._clock = clock
        # Where the clusters' breaker counts are read: the data plane holds the slots.
        self.breaker_counts = breaker_counts
        self._clusters: dict[str, Cluster] = {}
        self.local_table = EndpointTable(empty_hold=0.0, clock=clock)
        self.local: Cluster | None = None
        if app is not None:
            self.local_table.replace(
                [InstanceInfo(instance_id=LOCAL_SERVICE, address=app, grpc_services=("*",))]
            )
            # The app is the only endpoint: never eject it, retry it, or panic over it.
            self.local = Cluster(
                "*",
                self.local_table,
                ServicePolicy(retry=RetrySettings(max_attempts=1)),
                make_balancer("round_robin"),
                OutlierSettings(max_ejected_percent=0.0, panic_threshold=0.0),
                clock=clock,
                breaker_counts=lambda key: self.breaker_counts(key),
            )

    def cluster(self, service: str) -> Cluster:
        """The cluster for ``service``; ``UnknownService`` when no instance declares it."""
        found = self._clusters.get(service)
        if found is not None:
            return found
        if self._table.synced and self._table.members(service) is None:
            # Not cached: callers inventing service names must not grow this map.
            raise UnknownService(service)
        if not valid_service(service):
            raise UnknownService(service)
        cluster = Cluster(
            service,
            self._table,
            self._config.policy(service),
            make_balancer(self._config.balancer_name(service)),
            self._config.outlier,
            clock=self._clock,
            breaker_counts=lambda key: self.breaker_counts(key),
        )
        self._clusters[service] = cluster
        return cluster

    def clusters(self) -> dict[str, Cluster]:
        return dict(self._clusters)
