"""Shoal's sidecar data plane: gRPC calls forwarded as raw HTTP/2, decided in Python.

The data plane calls the control plane it is given (a ``ControlPlane``) from its own
thread, and reads its answers by type: ``Admission``, ``Target`` and ``Refusal`` are
classes of this module, and each cluster's ``Breaker`` lives here too. See
``proxy_sidecar.control`` for the control plane itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

# The data plane allocates with mimalloc, which reads its options once, when the
# extension loads. By default it keeps freed pages for reuse and commits its arenas
# up front: thousands of connections that come and go would leave their memory with
# the sidecar for good (3,000 idle connections: +92 MiB, none of it back after they
# closed), and an idle sidecar would hold 6 MiB it never touched. Giving pages back as
# soon as they are free costs no CPU per call that the sidecar bench can see.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")

from shoal_dataplane._native import (  # noqa: E402
    Admission,
    Breaker,
    DataPlane,
    OwnCall,
    Refusal,
    Target,
)

__all__ = [
    "Admission",
    "Breaker",
    "CallControl",
    "ControlPlane",
    "DataPlane",
    "OwnCall",
    "Refusal",
    "Target",
]


class CallControl(Protocol):
    """One call's state in the control plane, as the data plane drives it."""

    def pick(self) -> Target | Refusal:
        """The next try's endpoint (a retry), or the refusal the caller gets."""

    def failed(self, code: int, replayable: bool, elapsed: float) -> float | None:
        """A try ended with ``code`` before an answer: the pause before a retry, or None."""

    def finish(self, code: int, latency: float | None) -> None:
        """The call ended with ``code``; ``latency`` when the last try's upstream answered."""


class ControlPlane(Protocol):
    """What the data plane asks, call by call, and tells of its connections."""

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Sequence[tuple[str, str]],
        remaining: float | None,
    ) -> Admission | Refusal:
        """Route a new call that arrived on the app-facing (or, ``inbound``, the
        mesh-facing) listener; ``remaining`` is the caller's deadline in seconds."""

    def connection_state(self, address: str, state: str) -> None:
        """The upstream connection to ``address`` changed state (READY, CONNECTING, ...)."""

    def reflect(self, request: bytes) -> bytes:
        """The answer to a server reflection request about the sidecar's own services."""
