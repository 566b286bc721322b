"""Shoal's sidecar proxy: forwards an app's gRPC calls to healthy instances, brings the app
into the mesh.

Domain modules (``endpoints``, ``balancers``, ``policies``, ``outlier``,
``resilience``, ``cluster``, ``routing``, ``shapes``, ``config``) never import
grpc; ``forwarder`` maps calls onto them through the ``unary`` fast path or the
``streaming`` path (both retry through ``tries``) and route errors onto status
codes; ``discovery``, ``membership``, ``reflect`` and ``pool`` talk gRPC to the
registry, the app and the upstreams; ``server`` owns the lifecycle.
"""

from __future__ import annotations

from proxy_sidecar.config import SidecarConfig, load_config
from proxy_sidecar.server import SidecarServer

__all__ = ["SidecarConfig", "SidecarServer", "load_config"]
