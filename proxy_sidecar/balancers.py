"""The load balancer interface, and finding balancers by name through entry points.

A balancer is chosen per gRPC service by name. Names map to classes through the
``shoal.balancers`` entry-point group, so a package that declares

    [project.entry-points."shoal.balancers"]
    my_policy = "my_pkg.balancing:MyPolicy"

adds a policy without touching the proxy. No gRPC here.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Collection, Sequence
from importlib.metadata import entry_points
from typing import ClassVar

from proxy_sidecar.endpoints import Endpoint
from proxy_sidecar.errors import PolicyError

__all__ = ["ENTRY_POINT_GROUP", "Balancer", "available", "balancer_class", "make_balancer"]

ENTRY_POINT_GROUP = "shoal.balancers"


class Balancer(abc.ABC):
    """Chooses the endpoint for one call among the routable endpoints of a service.

    ``endpoints`` is never empty; the caller passes a new list object whenever the
    routable set changes, so a policy may cache what it derives from the list and
    check ``is`` to see if it is still valid. ``key`` is the hashing value taken
    from the call's metadata (only for policies with ``uses_key``). ``exclude``
    holds endpoints already tried by this call; return ``None`` when every
    endpoint is excluded.
    """

    name: ClassVar[str] = ""
    uses_key: ClassVar[bool] = False

    @abc.abstractmethod
    def pick(
        self, endpoints: Sequence[Endpoint], key: str | None, exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        """Return the endpoint for this call."""


@functools.cache
def _registered() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """The balancer names that are installed."""
    return sorted(_registered())


@functools.cache
def balancer_class(name: str) -> type[Balancer]:
    """Load the class registered under ``name``; ``PolicyError`` names the choices."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            cls = ep.load()
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"load balancer {name!r} cannot be loaded: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Balancer)):
            raise PolicyError(f"load balancer {name!r} ({ep.value}) is not a Balancer")
        return cls
    choices = ", ".join(available()) or "none installed"
    raise PolicyError(f"unknown load balancer {name!r} (choose from: {choices})")


def make_balancer(name: str) -> Balancer:
    """A fresh balancer: each service gets its own, so policies may keep state."""
    return balancer_class(name)()
