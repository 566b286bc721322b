"""Which status a domain error gets: one rule for every Shoal service (no gRPC here).

Each service names its error classes and their codes once; an error gets the code
of the most specific class it is an instance of (its own class, else the nearest
base in its method resolution order), else the service's default. A subclass added
later inherits its base's code instead of falling through to the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

__all__ = ["ErrorCodes"]

C = TypeVar("C")


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
