"""The sidecar's admin pages: ``/healthz``, ``/endpoints`` (JSON) and ``/metrics``.

They are served by ``shoal_core.http.HttpServer`` on the sidecar's own event loop,
so every page is built where the sidecar's state lives and never sees a
half-applied update. This module holds what is the sidecar's own: the JSON page.
"""

from __future__ import annotations

import json

from shoal_core.http import Page

__all__ = ["Page", "json_page"]


def json_page(data: object, status: int = 200) -> Page:
    """``data`` as an indented JSON page."""
    return status, "application/json", json.dumps(data, indent=2).encode() + b"\n"
