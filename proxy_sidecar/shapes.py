"""Which methods are unary, published in an instance's registry metadata (no gRPC).

A proxy cannot learn a call's shape from the wire (every call is a stream
there), yet unary calls are forwarded far more cheaply when the proxy knows they
are unary. So the sidecar beside an app reads the app's schema through server
reflection and publishes, per gRPC service, its unary-unary methods under
``shoal.unary/<full.service.Name>`` as comma-separated method names.

Any subset of the truth is safe: a method not listed simply takes the general
stream path. That is what makes the registry's limits easy to respect (a value
too long is cut at a name, a service whose key would be too long or over the
key count is left out), and why a key is published even for a service with no
unary method: a present key says "exactly these", an absent one "unknown".
Instances that say nothing about a service are ignored when the mesh's view is
merged; instances that do say must all agree a method is unary for it to be.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

__all__ = ["UNARY_PREFIX", "merge_unary", "publish_unary", "read_unary"]

UNARY_PREFIX = "shoal.unary/"
# The registry's limits on instance metadata (registry_service/validation.py).
MAX_KEYS = 64
MAX_KEY = 128
MAX_VALUE = 1024

Shapes = Mapping[str, frozenset[str]]


def publish_unary(
    unary: Mapping[str, Collection[str]], taken: Collection[str] = ()
) -> tuple[dict[str, str], list[str]]:
    """Metadata entries for ``unary`` (service -> unary method names) beside the ``taken``
    keys, and the services left out or cut short, so the caller can say so."""
    entries: dict[str, str] = {}
    dropped: list[str] = []
    room = MAX_KEYS - len(taken)
    for service in sorted(unary):
        key = UNARY_PREFIX + service
        if key in taken or len(key) > MAX_KEY or len(entries) >= room:
            dropped.append(service)
            continue
        names: list[str] = []
        size = -1
        for method in sorted(unary[service]):
            size += len(method) + 1
            if size > MAX_VALUE:
                dropped.append(f"{service} (some methods)")
                break
            names.append(method)
        entries[key] = ",".join(names)
    return entries, dropped


def read_unary(metadata: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """The unary methods an instance's metadata publishes, by gRPC service."""
    return {
        key[len(UNARY_PREFIX) :]: frozenset(m for m in value.split(",") if m)
        for key, value in metadata.items()
        if key.startswith(UNARY_PREFIX)
    }


def merge_unary(views: Iterable[Shapes]) -> dict[str, frozenset[str]]:
    """The methods every instance that speaks about a service agrees are unary."""
    merged: dict[str, frozenset[str]] = {}
    for view in views:
        for service, methods in view.items():
            found = merged.get(service)
            merged[service] = methods if found is None else found & methods
    return merged
