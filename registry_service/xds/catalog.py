"""The registry's live state as xDS resources, built once per change and shared by
every stream (protobuf only, no gRPC).

Every valid service name has resources, whether or not it has instances yet: a client
may start before the service it calls, and then sees a channel with no endpoints
(calls fail UNAVAILABLE, or wait with ``wait_for_ready``) that fills in as instances
register, rather than a target that "does not exist". For the same reason a service
whose last instance went is served an empty ClusterLoadAssignment: in the state of
the world protocol, leaving an endpoint resource out of a response does not delete
it, so the client would keep calling the instances it last heard of.

A Listener, RouteConfiguration and Cluster depend on the name alone; a
ClusterLoadAssignment is built when a stream first asks for it after a change to its
service, then served to every stream from the cache until the next change: N
subscribers cost one build per change, not N. Each resource comes with a digest of
its deterministic serialization, which is how a stream tells that what it sent is
still current without holding a copy of it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf import any_pb2, message

from registry_service.backend import RegistryView
from registry_service.errors import InvalidArgument
from registry_service.model import Event
from registry_service.validation import check_service_name
from registry_service.xds import resources
from registry_service.xds.names import HostNames
from registry_service.xds.policy import DEFAULT, XdsPolicies, XdsPolicy
from registry_service.xds.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTE
from shoal_core.addresses import parse_address

__all__ = ["WILDCARD_TYPES", "Catalog", "Resource", "registered_hosts"]

# The types whose empty subscription means "all of them" (the xDS spec's wildcard).
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})

# Resources of names nobody registered are cached too, but only this many: clients
# choose those names, so they must not be able to grow the cache without bound.
_NAME_ONLY_CACHE = 4096


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource, packed for a DiscoveryResponse, and the digest of its bytes."""

    packed: any_pb2.Any
    digest: bytes


def _resource(msg: message.Message) -> Resource:
    packed = any_pb2.Any()
    packed.Pack(msg, deterministic=True)
    return Resource(packed, hashlib.blake2b(packed.value, digest_size=16).digest())


def _valid(name: str) -> bool:
    try:
        check_service_name("name", name)
    except InvalidArgument:
        return False
    return True


@functools.lru_cache(maxsize=_NAME_ONLY_CACHE)
def _by_name(type_url: str, service: str, policy: XdsPolicy, trust_domain: str | None) -> Resource:
    """The resources that depend on the service's name, policy and mesh alone (an empty
    endpoint list included); policies are frozen values, so they key the cache."""
    if type_url == LISTENER:
        return _resource(resources.listener(service))
    if type_url == ROUTE:
        return _resource(resources.route_config(service, policy))
    if type_url == CLUSTER:
        return _resource(resources.cluster(service, policy, trust_domain))
    return _resource(resources.load_assignment(service, ()))


def registered_hosts(view: RegistryView) -> Iterator[str]:
    """The host of every instance's address (``names`` keeps those resolved)."""
    for inst in view.instances():
        yield parse_address(inst.spec.address).host


class Catalog:
    """The resources of every service in ``view``, with ``policies`` (default: round
    robin and nothing else), on mTLS in mesh ``trust_domain`` if given; ``changed``
    drops a service's endpoints from the cache."""

    def __init__(
        self,
        view: RegistryView,
        policies: XdsPolicies | None = None,
        trust_domain: str | None = None,
        names: HostNames | None = None,
    ) -> None:
        self._view = view
        self._policies = policies or XdsPolicies({})
        self._trust_domain = trust_domain
        # How endpoints get IP literals from registered hosts (None: they are IPs).
        self._address_of = None if names is None else names.address_of
        # service -> its ClusterLoadAssignment; absent: not built since the last change.
        self._endpoints: dict[str, Resource] = {}

    def changed(self, event: Event) -> None:
        self._endpoints.pop(event.instance.spec.service, None)

    def names_changed(self) -> None:
        """A host name resolves to another address: every endpoint list may hold it."""
        self._endpoints.clear()

    def lookup(self, type_url: str, names: Iterable[str] | None) -> dict[str, Resource]:
        """The resources of ``type_url`` named ``names`` (``None``: those of every
        service with instances); a name that is no valid service name has none."""
        if names is None:
            names = [summary.name for summary in self._view.services()]
        return {name: self._get(type_url, name) for name in names if _valid(name)}

    def _get(self, type_url: str, service: str) -> Resource:
        if type_url != ENDPOINTS:
            return _by_name(type_url, service, self._policies.of(service), self._trust_domain)
        built = self._endpoints.get(service)
        if built is None:
            members = self._view.instances(service)
            if not members:
                return _by_name(ENDPOINTS, service, DEFAULT, None)
            built = self._endpoints[service] = _resource(
                resources.load_assignment(service, members, self._address_of)
            )
        return built
