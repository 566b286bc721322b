"""The registry's errors; the servicer maps each to one gRPC status code.

RegistryError
+-- InvalidArgument   a field of the request is wrong (names the field)
+-- AlreadyExists     the instance id is held by a live lease from another address
+-- LeaseNotFound     the lease is unknown or has expired: register again
+-- LimitReached      a bound on what the registry holds would be passed
+-- StoreUnavailable  the registry's store (etcd) cannot be reached: try again
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "InvalidArgument",
    "LeaseNotFound",
    "LimitReached",
    "RegistryError",
    "StoreUnavailable",
]


class RegistryError(Exception):
    """Base of every error the registry reports to a caller."""


class InvalidArgument(RegistryError):
    """A request field is invalid; ``field`` is its dotted path in the request."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class AlreadyExists(RegistryError):
    """Another address holds a live lease on this instance id."""


class LeaseNotFound(RegistryError):
    """The lease is unknown or has lapsed; the caller should register again."""


class LimitReached(RegistryError):
    """Registering would pass a bound of the registry's config; the message names it."""


class StoreUnavailable(RegistryError):
    """The backend's store cannot be reached now; the caller may try again (another
    replica, or later). Reads still answer from what this replica last saw."""
