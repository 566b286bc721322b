"""The sidecar's admin pages: /healthz, /endpoints and /metrics, read from the server.

They only read: the pod's health, what the sidecar knows of each endpoint, and its
metrics (built at the first scrape, see ``metrics``), served by ``shoal_core.http``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protos import registry_pb2 as pb
from shoal_core.http import Page, PageBuilder, json_page

if TYPE_CHECKING:
    from proxy_sidecar.server import SidecarServer

__all__ = ["AdminPages"]


class AdminPages:
    """The pages of one ``SidecarServer``."""

    def __init__(self, server: SidecarServer) -> None:
        self._server = server
        self._page: PageBuilder | None = None

    def healthz(self) -> Page:
        """The pod's health: this sidecar's, and its app's as its last check found it.

        A sidecar whose data plane is gone forwards nothing, whatever else is well; one
        cut off from its app, or whose app is not SERVING, brings nothing into the mesh.
        All three are unhealthy, so one probe of this page stands for the whole pod.
        """
        server = self._server
        forwarding = server.forwarding()
        member = server.membership
        if server.draining:
            status = "draining"
        elif not forwarding:
            status = "down"
        elif member is not None and not member.app_reachable:
            status = "app unreachable"
        elif member is not None and member.status != pb.SERVING:
            status = "app not serving"
        else:
            status = "serving"
        body: dict[str, object] = {
            "status": status,
            "dataplane": "running" if forwarding else "stopped",
            "registry_connected": server.discovery.connected,
            "registry_synced": server.table.synced,
            "endpoints": len(server.table.endpoints()),
        }
        body["identity"] = None if server.tls is None else str(server.tls.identity)
        if member is not None:
            body["app_reachable"] = member.app_reachable
            body["app_serving"] = member.status == pb.SERVING
            body["app_registered"] = bool(member.lease_id)
            body["instance_id"] = member.instance_id
        return json_page(body, 200 if status == "serving" else 503)

    def metrics(self) -> Page:
        server = self._server
        # prometheus_client (with http.server, urllib and email under it) is loaded at
        # the first scrape: a sidecar nobody scrapes does not carry it.
        if self._page is None:
            from prometheus_client import CollectorRegistry

            from proxy_sidecar.metrics import SidecarCollector
            from shoal_core.metrics import metrics_page

            registry = CollectorRegistry()
            registry.register(
                SidecarCollector(
                    server.router.clusters,
                    server.discovery,
                    server.connections,
                    server.policy,
                    golden=None if server.control is None else server.control.golden,
                    handshakes=server.handshakes,
                    spans=server.spans,
                )
            )
            self._page = metrics_page(registry)
        return self._page()

    def endpoints(self) -> Page:
        server = self._server
        services = {name: c.snapshot() for name, c in sorted(server.router.clusters().items())}
        if server.router.local is not None:
            services["(local app)"] = server.router.local.snapshot()
        unrouted = sorted(
            {s for e in server.table.endpoints() for s in e.info.grpc_services} - set(services)
        )
        for name in unrouted:
            services[name] = {
                "endpoints": [
                    {"instance_id": e.instance_id, "address": e.address, "state": e.state}
                    for e in server.table.endpoints()
                    if name in e.info.grpc_services
                ],
                "note": "no call routed yet",
            }
        return json_page(
            {
                "registry": {
                    "address": server.registry_address,
                    "connected": server.discovery.connected,
                    "revision": server.discovery.revision,
                    "watch_restarts": dict(server.discovery.restarts),
                    "held_empty": sorted(server.table.held()),
                },
                "services": services,
            }
        )
