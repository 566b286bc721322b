"""Which status a domain error gets: one rule for every Shoal service (no gRPC here).

Each service names its error classes and their codes once; an error gets the code
of the most specific class it is an instance of (its own class, else the nearest
base in its method resolution order), else the service's default. A subclass added
later inherits its base's code instead of falling through to the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

__all__ = [
    "CODE_NAMES",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "OK",
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "ErrorCodes",
    "code_name",
]

C = TypeVar("C")

# gRPC's status codes by number, for code that speaks them without importing grpc.
CODE_NAMES = tuple(
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS "
    "PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE "
    "UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED".split()
)
# The ones Shoal's own code names, as plain ints (they cross into the data plane).
OK = 0
INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, PERMISSION_DENIED = 3, 4, 5, 7
UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 12, 13, 14


def code_name(code: int) -> str:
    """A status code's name; numbers gRPC does not define are UNKNOWN, as gRPC reads them."""
    return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else "UNKNOWN"


class ErrorCodes(Generic[C]):
    """Error classes to codes, matched most specific first."""

    __slots__ = ("_codes", "_default")

    def __init__(self, codes: Mapping[type[BaseException], C], *, default: C) -> None:
        self._codes = dict(codes)
        self._default = default

    def __call__(self, exc: BaseException) -> C:
        for cls in type(exc).__mro__:
            found = self._codes.get(cls)
            if found is not None:
                return found
        return self._default
