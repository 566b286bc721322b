"""Shoal's sidecar data plane: gRPC calls forwarded as raw HTTP/2, decided in Python.

The data plane calls the control plane it is given (a ``ControlPlane``) from its own
thread, and reads its answers by type: ``Admission``, ``Target`` and ``Refusal`` are
classes of this module, and each cluster's ``Breaker`` lives here too. See
``proxy_sidecar.control`` for the control plane itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shoal_dataplane._native import Admission, Breaker, DataPlane, Refusal, Target

__all__ = ["Admission", "Breaker", "CallControl", "ControlPlane", "DataPlane", "Refusal", "Target"]


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
