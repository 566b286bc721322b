"""The load balancer interface, and finding balancers by name through entry points.

A balancer is chosen per gRPC service by name: one of the built-in policies
(``proxy_sidecar.policies``), or a class found through the ``shoal.balancers``
entry-point group, so a package that declares

    [project.entry-points."shoal.balancers"]
    my_policy = "my_pkg.balancing:MyPolicy"

adds a policy without touching the proxy. Entry points are read only for a name
that is not built in: reading them means loading importlib.metadata and every
installed distribution's metadata, a few MiB that a sidecar on the built-in
policies does not need. No gRPC here.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, ClassVar

from proxy_sidecar.endpoints import Endpoint
from proxy_sidecar.errors import PolicyError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoints

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


def _builtin() -> dict[str, type[Balancer]]:
    from proxy_sidecar.policies import BUILTIN  # it subclasses Balancer, defined above

    return BUILTIN


def _plugins(name: str | None = None) -> EntryPoints:
    from importlib.metadata import entry_points

    if name is None:
        return entry_points(group=ENTRY_POINT_GROUP)
    return entry_points(group=ENTRY_POINT_GROUP, name=name)


def available() -> list[str]:
    """The balancer names that can be chosen: built in, and installed as entry points."""
    return sorted(set(_builtin()) | {ep.name for ep in _plugins()})


@functools.cache
def balancer_class(name: str) -> type[Balancer]:
    """The class for ``name``; ``PolicyError`` names the choices."""
    builtin = _builtin().get(name)
    if builtin is not None:
        return builtin
    for ep in _plugins(name):
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
