"""Prometheus metrics primitives shared by the services.

Each service keeps its metrics in its own ``CollectorRegistry`` so that tests
can run several servers in one process without name clashes, and exposes them
as a ``/metrics`` page of its ``shoal_core.http.HttpServer``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shoal_core.http import Page, PageBuilder

__all__ = ["CollectorRegistry", "metrics_page", "render"]


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(registry)


def metrics_page(registry: CollectorRegistry) -> PageBuilder:
    """A page builder for ``/metrics``: the registry as Prometheus scrapes it."""

    def page() -> Page:
        return 200, CONTENT_TYPE_LATEST, render(registry)

    return page
