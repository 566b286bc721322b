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
# extension loads. Eager commit is off: an idle sidecar would hold 6 MiB it never
# touched. Freed pages go back to the OS a second after they are free (mimalloc's own
# default, said here because src/alloc.rs counts on it): at once, a large message would
# fault in fresh pages for every buffer it passes through (two sidecars moved 1 MiB
# Echoes at 381 MiB/s, against 600 with the delay). mimalloc carries out a delayed
# purge only when it is next used, so the data plane asks it every second: otherwise
# 3,000 connections that came and went would leave +92 MiB with an idle sidecar.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "1000")
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

    def finish(
        self,
        code: int,
        latency: float | None,
        elapsed: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """The call ended with ``code``; ``latency`` when the last try's upstream answered;
        ``elapsed``, the whole call's seconds from admission to its end; the message
        bytes read from the caller and sent back to it."""


class ControlPlane(Protocol):
    """What the data plane asks, call by call, and tells of its connections."""

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Sequence[tuple[str, str]],
        remaining: float | None,
        peer: str | None,
    ) -> Admission | Refusal:
        """Route a new call that arrived on the app-facing (or, ``inbound``, the
        mesh-facing) listener; ``remaining`` is the caller's deadline in seconds;
        ``peer`` is the caller's SPIFFE ID, proved by its client certificate, on a
        secure data plane's mesh-facing listener (else None)."""

    def connection_state(self, address: str, state: str) -> None:
        """The upstream connection to ``address`` changed state (READY, CONNECTING, ...)."""

    def reflect(self, request: bytes) -> bytes:
        """The answer to a server reflection request about the sidecar's own services."""
