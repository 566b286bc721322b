"""Shoal's service registry: leases, heartbeats, two-stage expiry, discovery and watch.

Domain modules (``model``, ``store``, ``history``, ``preservation``, ``watch``,
``validation``) never import grpc; ``servicer`` maps the wire onto them and
``server`` owns the lifecycle. ``xds/`` serves the same view as xDS, for gRPC clients
with ``xds:///SERVICE`` targets.
"""

from __future__ import annotations

from registry_service.config import RegistryConfig
from registry_service.server import RegistryServer

__all__ = ["RegistryConfig", "RegistryServer"]
