"""The registry as an xDS control plane, for gRPC clients with ``xds:///SERVICE``
targets and no sidecar.

Domain modules with no gRPC: ``resources`` (the xDS resources of one service),
``catalog`` (every service's, built once per change), ``streams`` (one stream's
subscriptions, ACKs and NACKs); ``ads`` serves them as the Aggregated Discovery
Service.
"""

from __future__ import annotations

from registry_service.xds.ads import AdsServicer

__all__ = ["AdsServicer"]
