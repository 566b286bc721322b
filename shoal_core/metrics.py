"""Prometheus metrics primitives shared by the services.

Each service keeps its metrics in its own ``CollectorRegistry`` so that tests
can run several servers in one process without name clashes, and exposes them
as a ``/metrics`` page of its ``shoal_core.http.HttpServer``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shoal_core.http import HttpServer, Page, PageBuilder

__all__ = ["CollectorRegistry", "metrics_endpoint", "metrics_page", "render"]


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(registry)


def metrics_page(registry: CollectorRegistry) -> PageBuilder:
    """A page builder for ``/metrics``: the registry as Prometheus scrapes it."""

    def page() -> Page:
        return 200, CONTENT_TYPE_LATEST, render(registry)

    return page


def metrics_endpoint(listen: str, registry: CollectorRegistry) -> HttpServer:
    """The ``--metrics`` server of a service: ``/metrics`` alone, on the service's loop."""
    return HttpServer(listen, {"/metrics": metrics_page(registry)}, name="metrics")
