"""Shoal's sidecar data plane: gRPC calls forwarded as raw HTTP/2, decided in Python.

See ``proxy_sidecar.control`` for the calls it makes into the control plane.
"""

from shoal_dataplane._native import DataPlane

__all__ = ["DataPlane"]
