"""The sidecar's errors; ``control`` maps each route error to one gRPC status code.

SidecarError
+-- RouteError            the call cannot be routed (the caller gets its code)
|   +-- UnknownService      no instance in the mesh declares the gRPC service: UNIMPLEMENTED
|   +-- NoHealthyEndpoint   the service is known but nothing routable is left: UNAVAILABLE
+-- PolicyError           a load balancer name or policy setting is unknown (a user error)
+-- MembershipError       the co-located app cannot be brought into the mesh (a user error)
"""

from __future__ import annotations

__all__ = [
    "MembershipError",
    "NoHealthyEndpoint",
    "PolicyError",
    "RouteError",
    "SidecarError",
    "UnknownService",
]


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class RouteError(SidecarError):
    """A call cannot be sent anywhere; ``str()`` is the status details the caller sees."""


class UnknownService(RouteError):
    """No instance known to the registry declares this gRPC service."""

    def __init__(self, service: str) -> None:
        self.service = service
        super().__init__(f"shoal: no instance in the mesh serves gRPC service {service!r}")


class NoHealthyEndpoint(RouteError):
    """The service is known, but no instance of it can take calls now."""

    def __init__(self, service: str, reason: str) -> None:
        self.service = service
        super().__init__(f"shoal: no healthy instance of {service!r} ({reason})")


class PolicyError(SidecarError):
    """A load balancer or policy named in the flags or the config does not exist."""


class MembershipError(SidecarError):
    """The co-located app could not be described or registered."""
