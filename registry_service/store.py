"""The registry's state: instances, their leases, revisions and change history.

Everything runs on one event loop, so there are no locks: each method runs to
completion. Every change bumps the revision by one and yields exactly one
``Event``, which is kept in a bounded history (for watchers resuming from a
revision) and handed to listeners (the watch hub). Revisions start at the
wall-clock microsecond, so a restarted registry never reuses an old revision.
What callers can make it hold is bounded: instances in all, per service and in
bytes (``LimitReached`` beyond), and the history in events and in bytes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from registry_service.config import RegistryConfig
from registry_service.errors import AlreadyExists, LeaseNotFound
from registry_service.history import History, Replay
from registry_service.model import (
    Event,
    EventKind,
    Instance,
    InstanceSpec,
    LoadReport,
    ServiceSummary,
    ServingStatus,
)
from registry_service.preservation import SelfPreservation
from registry_service.table import InstanceTable, check_room

__all__ = ["RegistryStore", "StoreStats"]

Listener = Callable[[Event], None]


@dataclass(slots=True)
class _Lease:
    lease_id: str
    instance_id: str
    ttl: float
    renewed_at: float
    load_published_at: float
    # A load report that arrived too soon after the last one published; the sweep sends it.
    pending_load: LoadReport | None = None


@dataclass(slots=True)
class StoreStats:
    """Counters since start, read by the metrics collector."""

    registrations: int = 0
    heartbeats: int = 0
    heartbeats_not_found: int = 0
    deregistrations: int = 0
    lapses: int = 0
    removals: int = 0


class RegistryStore:
    """Instances (an ``InstanceTable``, which answers the reads) and their leases."""

    def __init__(
        self, config: RegistryConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._table = InstanceTable()
        self._leases: dict[str, _Lease] = {}
        self._lease_by_instance: dict[str, _Lease] = {}
        self._lapsed_at: dict[str, float] = {}
        self._revision = time.time_ns() // 1000
        self.history = History(max_events=config.history_size, max_bytes=config.history_bytes)
        self._listeners: list[Listener] = []
        self.epoch = uuid.uuid4().hex[:12]
        self.stats = StoreStats()
        self.preservation = SelfPreservation(
            share=config.preservation_share,
            window=config.preservation_window,
            max_duration=config.preservation_max,
            min_instances=config.preservation_min_instances,
        )

    # -- reading -------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def instances_bytes(self) -> int:
        """The retained_bytes() of every registered spec, bounded by max_instances_bytes."""
        return self._table.instances_bytes

    def __len__(self) -> int:
        return len(self._table)

    def get(self, instance_id: str) -> Instance | None:
        return self._table.get(instance_id)

    def _held(self, instance_id: str) -> Instance:
        inst = self._table.get(instance_id)
        assert inst is not None, f"a lease of {instance_id!r} outlived its instance"
        return inst

    def service_of_lease(self, lease_id: str) -> str | None:
        """The service whose instance holds ``lease_id``, if the lease is live."""
        lease = self._leases.get(lease_id)
        return None if lease is None else self._held(lease.instance_id).spec.service

    def lease_age(self, instance_id: str) -> float:
        lease = self._lease_by_instance.get(instance_id)
        if lease is None:
            lapsed = self._lapsed_at.get(instance_id)
            return 0.0 if lapsed is None else self._clock() - lapsed
        return self._clock() - lease.renewed_at

    def instances(self, service: str = "") -> list[Instance]:
        return self._table.instances(service)

    def discover(self, service: str, grpc_service: str, include_unhealthy: bool) -> list[Instance]:
        """Instances of ``service`` and/or serving ``grpc_service``; healthy ones unless asked."""
        return self._table.discover(service, grpc_service, include_unhealthy)

    def grpc_owners(self, grpc_service: str) -> set[str]:
        """The services whose instances say they serve ``grpc_service``."""
        return self._table.grpc_owners(grpc_service)

    def address_owners(self, address: str) -> set[str]:
        """The services with an instance registered at ``address``."""
        return self._table.address_owners(address)

    def events_since(self, revision: int, service: str = "") -> Replay | None:
        """Events after ``revision`` up to now, read lazily in order; None when the history
        cannot bridge the gap. If it moves past a slow reader, the replay ends ``lost``."""
        if revision > self._revision:
            return None  # from another run of the registry, or made up
        return self.history.replay(after=revision, until=self._revision, service=service)

    def services(self) -> list[ServiceSummary]:
        return self._table.services()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- changing ------------------------------------------------------------

    def register(self, spec: InstanceSpec, ttl_requested: float, status: ServingStatus) -> Instance:
        """Grant a new lease; re-registering from the same address replaces the old lease."""
        now = self._clock()
        old = self._table.get(spec.instance_id)
        if old is not None:
            if old.spec.address != spec.address and old.lease_ok:
                raise AlreadyExists(
                    f"instance {spec.instance_id!r} is registered from {old.spec.address} "
                    f"with a live lease; {spec.address} cannot take it over"
                )
        check_room(self.config, self._table, spec)
        if old is not None:
            self._drop(old, publish=old.spec.service != spec.service)
        ttl = self.config.clamp_ttl(ttl_requested)
        lease = _Lease(uuid.uuid4().hex, spec.instance_id, ttl, now, float("-inf"))
        self._leases[lease.lease_id] = lease
        self._lease_by_instance[spec.instance_id] = lease
        self.stats.registrations += 1
        return self._publish(EventKind.UPSERT, Instance(spec, lease.lease_id, ttl, status))

    def heartbeat(self, lease_id: str, status: ServingStatus, load: LoadReport) -> Instance:
        """Renew a lease; publish a change of status at once and of load at most every interval."""
        lease = self._leases.get(lease_id)
        if lease is None:
            self.stats.heartbeats_not_found += 1
            raise LeaseNotFound(f"lease {lease_id!r} is unknown or expired; register again")
        now = self._clock()
        lease.renewed_at = now
        self.stats.heartbeats += 1
        inst = self._held(lease.instance_id)
        if status is not inst.status or (
            load != inst.load and now - lease.load_published_at >= self.config.load_publish_interval
        ):
            lease.load_published_at = now
            lease.pending_load = None
            return self._publish(EventKind.UPSERT, replace(inst, status=status, load=load))
        lease.pending_load = load if load != inst.load else None
        return inst

    def deregister(self, lease_id: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id!r} is unknown or expired")
        self.stats.deregistrations += 1
        self._drop(self._held(lease.instance_id), publish=True)

    def sweep(self) -> None:
        """Mark lapsed leases unhealthy, then remove those lapsed longer than the grace."""
        now = self._clock()
        overdue = []
        due = now - self.config.load_publish_interval
        for lease in list(self._leases.values()):
            if now - lease.renewed_at > lease.ttl:
                overdue.append(lease)
            elif lease.pending_load is not None and lease.load_published_at <= due:
                self._publish_load(lease, lease.pending_load, now)
        overdue_ids = [lease.instance_id for lease in overdue]
        if not self.preservation.allow_evictions(now, overdue_ids, len(self._table)):
            return
        for lease in overdue:
            del self._leases[lease.lease_id]
            del self._lease_by_instance[lease.instance_id]
            self._lapsed_at[lease.instance_id] = now
            self.stats.lapses += 1
            inst = self._held(lease.instance_id)
            self._publish(EventKind.UPSERT, replace(inst, lease_ok=False))
        grace = self.config.removal_grace
        expired = [i for i, at in self._lapsed_at.items() if now - at >= grace]
        for instance_id in expired:
            self.stats.removals += 1
            self._drop(self._held(instance_id), publish=True)

    # -- internals -----------------------------------------------------------

    def _publish_load(self, lease: _Lease, load: LoadReport, now: float) -> None:
        lease.load_published_at = now
        lease.pending_load = None
        inst = self._held(lease.instance_id)
        self._publish(EventKind.UPSERT, replace(inst, load=load))

    def _drop(self, inst: Instance, *, publish: bool) -> None:
        spec = inst.spec
        lease = self._lease_by_instance.pop(spec.instance_id, None)
        if lease is not None:
            del self._leases[lease.lease_id]
        self._lapsed_at.pop(spec.instance_id, None)
        self._table.pop(spec.instance_id)
        if publish:
            self._publish(EventKind.REMOVE, inst)

    def _publish(self, kind: EventKind, inst: Instance) -> Instance:
        self._revision += 1
        inst = replace(inst, revision=self._revision)
        if kind is EventKind.UPSERT:
            self._table.put(inst)
        event = Event(kind, self._revision, inst)
        self.history.append(event)
        for listener in self._listeners:
            listener(event)
        return inst
