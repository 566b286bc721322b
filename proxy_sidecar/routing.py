"""From a call's method path and metadata to the cluster that serves it (no gRPC).

Calls from the app (on the sidecar's app-facing listener) route by the gRPC service
in the path (``/pkg.Service/Method``) to the instances that declared it at
registration; the ``shoal-target-service`` metadata key overrides the service.
Calls from other sidecars (on the mesh-facing listener) go to this sidecar's own app.

A cluster exists only for a service the registry knows: before the first snapshot
nothing is created (the caller gets UNAVAILABLE), a name nobody declares is refused
without a trace, and the cluster of a service that left the registry is dropped, so
callers cannot make the sidecar hold state for names they invent. The clusters map
belongs to the data plane's thread; the event loop only copies it (``clusters()``).
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
from proxy_sidecar.errors import NoHealthyEndpoint, UnknownService

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
    ) -> None:
        self._table = table
        self._config = config
        self._clock = clock
        self._clusters: dict[str, Cluster] = {}
        # The table version the clusters were last pruned at.
        self._pruned = -1
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
            )

    def cluster(self, service: str) -> Cluster:
        """The cluster for ``service``; ``UnknownService`` when no instance declares it,
        ``NoHealthyEndpoint`` before the registry's first snapshot."""
        view = self._table.view
        if view.version != self._pruned:
            self._prune()
        found = self._clusters.get(service)
        if found is not None:
            return found
        if not view.synced:
            raise NoHealthyEndpoint(service, "the registry has not been reached yet")
        if service not in view.known or not valid_service(service):
            raise UnknownService(service)
        cluster = Cluster(
            service,
            self._table,
            self._config.policy(service),
            make_balancer(self._config.balancer_name(service)),
            self._config.outlier,
            clock=self._clock,
        )
        self._clusters[service] = cluster
        return cluster

    def _prune(self) -> None:
        """Drop the clusters of services the registry no longer knows."""
        view = self._table.view
        self._pruned = view.version
        if view.synced:
            gone = [name for name in self._clusters if name not in view.known]
            for name in gone:
                del self._clusters[name]

    def clusters(self) -> dict[str, Cluster]:
        return dict(self._clusters)
