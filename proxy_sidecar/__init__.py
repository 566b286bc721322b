"""Shoal's sidecar proxy: forwards an app's gRPC calls to healthy instances, brings the app
into the mesh.

Calls are forwarded by the native data plane (``shoal_dataplane``, Rust, in
``dataplane/``), which moves HTTP/2 frames and asks ``control`` where each call
goes and whether to retry it. Domain modules (``endpoints``, ``balancers``,
``policies``, ``outlier``, ``resilience``, ``cluster``, ``routing``, ``control``,
``config``) do no I/O; ``discovery``, ``membership`` and ``reflect`` talk gRPC to the
registry and the app through ``rpc``, on the data plane's connections (grpcio is never
loaded in a sidecar); ``server`` owns the lifecycle.
"""

from __future__ import annotations

from proxy_sidecar.config import SidecarConfig, load_config
from proxy_sidecar.server import SidecarServer

__all__ = ["SidecarConfig", "SidecarServer", "load_config"]
