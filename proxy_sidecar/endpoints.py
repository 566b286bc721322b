"""The endpoints a sidecar can route to, kept from the registry's view (no gRPC here).

``EndpointTable`` turns what the registry says (snapshots, upserts, removals) into
the routable endpoints of each gRPC service. Two rules protect traffic from a
registry that is wrong for a moment:

- fail-static: nothing changes while no update arrives (the registry being
  unreachable is not news about the endpoints);
- the empty-set guard: an update that would leave a gRPC service that has
  endpoints with none is held for ``empty_hold`` seconds; the service keeps its
  last endpoints until the registry has gone on saying "none" for that long, and
  any endpoint that reappears ends the hold at once.

Threads: the table is changed only on the event loop (discovery, connection states),
while calls are routed on the data plane's thread. Routing reads nothing of the table
but its ``view``, an immutable ``RouteView`` that each change replaces by one
reference assignment, so a pick never sees a half-applied update. Of an ``Endpoint``,
the loop writes ``info``, ``state`` and ``reachable``; the data plane thread writes
the call counts and latency (``in_flight``, ``ewma``, ``requests``, ``failures``).
Each field has one writer; the other thread only reads it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from shoal_dataplane import Target

__all__ = ["Endpoint", "EndpointTable", "InstanceInfo", "RouteView"]


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """What the registry says about one instance, as plain values."""

    instance_id: str
    address: str
    grpc_services: tuple[str, ...]
    weight: int = 100
    zone: str = ""
    # The lease is live and the instance says it is SERVING.
    routable: bool = True
    load_in_flight: int = 0
    load_queue_depth: int = 0
    load_cpu_percent: float = 0.0
    # The registered service: with mTLS, what the instance must prove it is.
    service: str = ""


class Endpoint:
    """One upstream instance and what this sidecar measures about it."""

    __slots__ = (
        "instance_id",
        "address",
        "target",
        "info",
        "in_flight",
        "ewma",
        "ewma_at",
        "reachable",
        "state",
        "requests",
        "failures",
    )

    def __init__(self, info: InstanceInfo) -> None:
        self.instance_id = info.instance_id
        self.address = info.address
        # What a pick hands the data plane: made once, so picking allocates nothing.
        self.target = Target(info.address, info.instance_id)
        self.info = info
        self.in_flight = 0
        # Peak EWMA of latency in seconds; 0 until the first observation.
        self.ewma = 0.0
        self.ewma_at = 0.0
        # False while the connection is failing (set by the channel pool).
        self.reachable = True
        self.state = "IDLE"
        self.requests = 0
        self.failures = 0

    @property
    def weight(self) -> int:
        return self.info.weight

    def observe_latency(self, seconds: float, now: float, decay: float) -> None:
        """Peak EWMA: jump to a slower sample at once, decay towards faster ones."""
        if seconds >= self.ewma or self.ewma_at == 0.0:
            self.ewma = seconds
        else:
            w = math.exp(-(now - self.ewma_at) / decay)
            self.ewma = self.ewma * w + seconds * (1.0 - w)
        self.ewma_at = now

    def latency_estimate(self, now: float, decay: float) -> float:
        """The EWMA aged by the time since it was measured, so a slow idle endpoint is retried."""
        if self.ewma_at == 0.0:
            return 0.0
        return self.ewma * math.exp(-(now - self.ewma_at) / decay)

    def __repr__(self) -> str:
        return f"Endpoint({self.instance_id}@{self.address})"


Listener = Callable[[Sequence[Endpoint], Sequence[Endpoint]], None]


@dataclass(frozen=True, slots=True)
class RouteView:
    """What routing may read of the table, fixed once published.

    ``members`` maps each gRPC service to its routable endpoints; ``known`` holds every
    gRPC service some registered instance declares, routable or not.
    """

    members: Mapping[str, tuple[Endpoint, ...]]
    known: frozenset[str]
    synced: bool
    version: int

    def members_of(self, service: str) -> tuple[Endpoint, ...] | None:
        """The endpoints of ``service``, ``()`` when it has none now, ``None`` when unknown."""
        found = self.members.get(service)
        if found is None and service in self.known:
            return ()
        return found


_EMPTY_VIEW = RouteView(MappingProxyType({}), frozenset(), False, 0)


class EndpointTable:
    """Routable endpoints by gRPC service name, updated from registry events."""

    def __init__(self, *, empty_hold: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._hold = empty_hold
        self._clock = clock
        self._registry: dict[str, InstanceInfo] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._members: dict[str, tuple[Endpoint, ...]] = {}
        self._held_since: dict[str, float] = {}
        self._listeners: list[Listener] = []
        # Replaced whole on every change that can alter a routable list; never mutated.
        self.view = _EMPTY_VIEW

    @property
    def version(self) -> int:
        """Bumped on every change that can alter a routable list; clusters compare it."""
        return self.view.version

    @property
    def synced(self) -> bool:
        """Whether a registry snapshot has arrived."""
        return self.view.synced

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(added, removed)`` whenever endpoints appear or leave."""
        self._listeners.append(listener)

    def members(self, service: str) -> tuple[Endpoint, ...] | None:
        """The endpoints of ``service``, ``()`` when it has none now, ``None`` when unknown."""
        return self.view.members_of(service)

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def held(self) -> dict[str, float]:
        """Services whose emptying is held, with the time the hold started."""
        return dict(self._held_since)

    def touch(self) -> None:
        """Note a change made outside the table (reachability) that routing must see."""
        self._publish(self.view.known, self.view.synced)

    def replace(self, infos: Iterable[InstanceInfo]) -> None:
        """Apply a snapshot: it replaces the whole registry view."""
        self._registry = {info.instance_id: info for info in infos}
        self._rebuild(synced=True)

    def upsert(self, info: InstanceInfo) -> None:
        old = self._registry.get(info.instance_id)
        self._registry[info.instance_id] = info
        endpoint = self._endpoints.get(info.instance_id)
        if (
            old is not None
            and endpoint is not None
            and old.routable == info.routable
            and old.address == info.address
            and old.grpc_services == info.grpc_services
            and old.weight == info.weight
        ):
            # Only the load report changed: no routable list is affected.
            endpoint.info = info
            return
        self._rebuild()

    def remove(self, instance_id: str) -> None:
        if self._registry.pop(instance_id, None) is not None:
            self._rebuild()

    def tick(self) -> None:
        """End holds that have lasted ``empty_hold`` seconds."""
        now = self._clock()
        if any(now - since >= self._hold for since in self._held_since.values()):
            self._rebuild()

    def _publish(self, known: frozenset[str], synced: bool) -> None:
        # One assignment: the data plane thread sees the old view or the new one, whole.
        # `_members` is never changed in place after this: the next rebuild makes anew.
        self.view = RouteView(MappingProxyType(self._members), known, synced, self.view.version + 1)

    def _rebuild(self, *, synced: bool | None = None) -> None:
        now = self._clock()
        previous = self._endpoints
        current: dict[str, Endpoint] = {}
        lists: dict[str, list[Endpoint]] = {}
        known: set[str] = set()
        for info in self._registry.values():
            known.update(info.grpc_services)
            if not info.routable:
                continue
            endpoint = previous.get(info.instance_id)
            if endpoint is None or endpoint.address != info.address:
                endpoint = Endpoint(info)
            endpoint.info = info
            current[info.instance_id] = endpoint
            for service in info.grpc_services:
                lists.setdefault(service, []).append(endpoint)
        old_members = self._members
        members = {service: tuple(found) for service, found in lists.items()}
        for service, old in old_members.items():
            if service in members or not old:
                self._held_since.pop(service, None)
                continue
            since = self._held_since.setdefault(service, now)
            if now - since < self._hold:
                members[service] = old
                for endpoint in old:
                    current.setdefault(endpoint.instance_id, endpoint)
            else:
                del self._held_since[service]
        self._members = members
        self._endpoints = current
        # A service whose emptying is held is still known: its calls go to the held set.
        known.update(members)
        self._publish(frozenset(known), self.view.synced if synced is None else synced)
        added = [e for key, e in current.items() if previous.get(key) is not e]
        removed = [e for key, e in previous.items() if current.get(key) is not e]
        if added or removed:
            for listener in self._listeners:
                listener(added, removed)
