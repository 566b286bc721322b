"""The etcd backend's ``RegistryView``: this replica's copy of the registry in etcd.

The mirror is fed (by ``registry_service.feed``) everything under the prefix as one
list, then each change in etcd's order, so every replica holds the same state at the
same revisions. A change to an instance's record becomes one registry ``Event`` at
etcd's revision of it (one revision changes at most one record), kept in a
``History`` and handed to listeners. The other keys are state beside the records:
which leases are alive, who leads the sweep, self-preservation.

An instance's lease is live while its alive key is there. When etcd deletes the key,
the instance stays as it was (overdue) until the leader marks its record lapsed
(``lease_ok`` false, the first stage of expiry) or, in self-preservation, does not.
Nothing here does I/O: it is plain state, changed only by what etcd said.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from registry_service.config import RegistryConfig
from registry_service.etcd import KeyValue, WatchEvent
from registry_service.history import History, Replay
from registry_service.model import Event, EventKind, Instance
from registry_service.records import (
    Keys,
    PreservationState,
    PreservationView,
    Record,
    decode_preservation,
    decode_record,
    parse_lease,
)
from registry_service.store import StoreStats
from registry_service.table import InstanceTable

__all__ = ["Mirror"]

logger = logging.getLogger(__name__)

Listener = Callable[[Event], None]


class Mirror(InstanceTable):
    """The instances under ``keys`` as of ``revision``, kept current by a watch."""

    def __init__(
        self,
        config: RegistryConfig,
        keys: Keys,
        *,
        stats: StoreStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.config = config
        self.stats = stats
        self.epoch = ""
        self._keys = keys
        self._clock = clock
        self.preservation = PreservationView(PreservationState(), 0.0)
        # Called with the lease the leader key is bound to (None: vacant) when it changes.
        self.on_leader: Callable[[int | None], None] = lambda lease: None
        self.leader: int | None = None
        self._by_lease: dict[int, str] = {}  # the lease in each record -> its instance
        self._alive: dict[str, int] = {}  # instance -> the lease its alive key is bound to
        self._lapsed_at: dict[str, float] = {}  # on this replica's clock
        self._renewed_at: dict[str, float] = {}  # as seen from this replica
        self._revision = 0
        self.history = self._new_history(0)
        self._listeners: list[Listener] = []
        self._moved = asyncio.Event()

    # -- RegistryView ------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    @property
    def revision(self) -> int:
        """The last etcd revision applied: every change up to it is in this view."""
        return self._revision

    def service_of_lease(self, lease_id: str) -> str | None:
        lease = parse_lease(lease_id)
        inst = None if lease is None else self.instance_of_lease(lease)
        return None if inst is None else inst.spec.service

    def lease_age(self, instance_id: str) -> float:
        now = self._clock()
        lapsed = self._lapsed_at.get(instance_id)
        if lapsed is not None:
            return now - lapsed
        renewed = self._renewed_at.get(instance_id)
        inst = self.get(instance_id)
        if renewed is None or inst is None:
            return 0.0
        if instance_id in self._alive:
            # Renewed through another replica, maybe; but within its TTL, or etcd would
            # have ended the lease: the age is at most that.
            return min(now - renewed, inst.ttl)
        return now - renewed

    def events_since(self, revision: int, service: str = "") -> Replay | None:
        if revision > self._revision:
            return None  # from another etcd cluster, or made up
        return self.history.replay(after=revision, until=self._revision, service=service)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- what the backend asks ---------------------------------------------------

    def instance_of_lease(self, lease: int) -> Instance | None:
        """The instance whose record holds ``lease``, unless it has been marked lapsed."""
        instance_id = self._by_lease.get(lease)
        inst = None if instance_id is None else self.get(instance_id)
        return inst if inst is not None and inst.lease_ok else None

    def alive_lease(self, instance_id: str) -> int:
        """The lease the instance's alive key is bound to; 0 when there is none."""
        return self._alive.get(instance_id, 0)

    def overdue(self) -> list[str]:
        """Instances whose lease has ended that are not marked lapsed yet."""
        return [
            i.instance_id
            for i in self.instances()
            if i.lease_ok and i.instance_id not in self._alive
        ]

    def lapsed(self) -> list[tuple[str, float]]:
        """Instances marked lapsed, each with when (on this replica's clock)."""
        return list(self._lapsed_at.items())

    def renewed(self, instance_id: str) -> None:
        self._renewed_at[instance_id] = self._clock()

    async def wait_for(self, revision: int, timeout: float) -> bool:
        """Wait until the mirror has applied ``revision``; False if ``timeout`` passed."""
        try:
            async with asyncio.timeout(timeout):
                while self._revision < revision:
                    await self._moved.wait()
        except TimeoutError:
            return False
        return True

    # -- following etcd ----------------------------------------------------------

    def advance(self, revision: int) -> None:
        if revision > self._revision:
            self._revision = revision
            # Wake every waiter at once; each looks again at the revision it needs.
            self._moved.set()
            self._moved = asyncio.Event()

    def apply(self, event: WatchEvent, *, record: bool = True) -> None:
        kind, instance_id = self._keys.parse(event.kv.key)
        kv = event.kv if event.type == "PUT" else None
        if kind == "instances":
            self._apply_record(instance_id, kv, event.revision, record)
        elif kind == "alive":
            if kv is None:
                self._alive.pop(instance_id, None)
            else:
                self._alive[instance_id] = kv.lease
                if self.get(instance_id) is not None:  # else its record's put says it
                    self._renewed_at[instance_id] = self._clock()
        elif kind == "leader":
            self.leader = None if kv is None else kv.lease
            self.on_leader(self.leader)
        elif kind == "preservation":
            self._apply_preservation(kv)

    def _apply_record(
        self, instance_id: str, kv: KeyValue | None, revision: int, record: bool
    ) -> None:
        old = self.get(instance_id)
        found = None if kv is None else self._decode(instance_id, kv)
        if found is None:
            if old is not None:
                self._forget(old)
                self._emit(EventKind.REMOVE, replace(old, revision=revision), record)
            return
        inst = found.instance
        # One spec object per lease, as in the memory store: the history counts it once.
        spec = old.spec if old is not None and old.spec == inst.spec else inst.spec
        inst = replace(inst, spec=spec, revision=revision)
        if old is None or old.lease_id != inst.lease_id:
            if old is not None:
                self._by_lease.pop(int(old.lease_id, 16), None)
            self._by_lease[found.lease] = instance_id
            self._renewed_at[instance_id] = self._clock()
        if found.lapsed_at is None:
            self._lapsed_at.pop(instance_id, None)
        elif instance_id not in self._lapsed_at:
            ago = max(0.0, time.time() - found.lapsed_at)
            self._lapsed_at[instance_id] = self._clock() - ago
        self.put(inst)
        self._emit(EventKind.UPSERT, inst, record)

    def _decode(self, instance_id: str, kv: KeyValue) -> Record | None:
        try:
            found = decode_record(kv.value)
            if found.instance.instance_id != instance_id:
                raise ValueError(f"it names instance {found.instance.instance_id!r}")
        except ValueError as exc:
            # Not written by a registry: taken for absent, so it cannot break the view.
            logger.warning("registry mirror: passing over %r: %s", kv.key, exc)
            return None
        return found

    def _forget(self, inst: Instance) -> None:
        instance_id = inst.instance_id
        self.pop(instance_id)
        self._by_lease.pop(int(inst.lease_id, 16), None)
        self._lapsed_at.pop(instance_id, None)
        self._renewed_at.pop(instance_id, None)

    def _apply_preservation(self, kv: KeyValue | None) -> None:
        state = PreservationState()
        if kv is not None:
            try:
                state = decode_preservation(kv.value)
            except ValueError as exc:
                logger.warning("registry mirror: passing over %r: %s", kv.key, exc)
        self.preservation = PreservationView(state, self._clock() - state.seconds_active())

    def _emit(self, kind: EventKind, inst: Instance, record: bool) -> None:
        event = Event(kind, inst.revision, inst)
        if record:
            self.history.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # one listener's bug must not stop the mirror
                logger.exception("registry mirror: a listener failed on %s", event)

    def reset(self, kvs: Sequence[KeyValue], revision: int) -> None:
        """Make the mirror what etcd listed at ``revision``, handing listeners each
        record that changed as an event, in revision order."""
        listed = {kv.key: kv for kv in kvs}
        changes: list[tuple[int, str, KeyValue | None]] = []
        self._alive.clear()
        if self._keys.leader not in listed and self.leader is not None:
            self.leader = None
            self.on_leader(None)
        if self._keys.preservation not in listed:
            self._apply_preservation(None)
        for kv in kvs:
            kind, instance_id = self._keys.parse(kv.key)
            if kind != "instances":
                self.apply(WatchEvent("PUT", kv, None))
            elif (old := self.get(instance_id)) is None or old.revision != kv.mod_revision:
                changes.append((kv.mod_revision, instance_id, kv))
        # When a record went is lost with the history; each removal takes a revision of
        # the gap no listed record has (there is one: each went at a revision of its own).
        taken = {change[0] for change in changes}
        free = (r for r in itertools.count(self._revision + 1) if r not in taken)
        gone = sorted(
            i.instance_id
            for i in self.instances()
            if self._keys.record(i.instance_id) not in listed
        )
        changes += [(next(free), instance_id, None) for instance_id in gone]
        for at, instance_id, change in sorted(changes, key=lambda change: change[0]):
            self._apply_record(instance_id, change, at, record=False)
        self.history = self._new_history(revision)
        self.advance(revision)

    def _new_history(self, start: int) -> History:
        cfg = self.config
        return History(max_events=cfg.history_size, max_bytes=cfg.history_bytes, start=start)
