"""The periodic task of an etcd replica: loads held back, and the leader's sweep.

``Loads`` decides which load reports a replica writes: a change of status at once, a
change of load at most once per ``load_publish_interval`` per instance; one that came
too soon waits for ``flush``, as in the memory store's sweep.

``Sweeper``: expiry and self-preservation, decided once for the whole mesh.

etcd ends an instance's lease and deletes its alive key; the instance is then overdue.
Each sweep, the leader hands the overdue instances to ``SelfPreservation`` (the same
logic as the memory store's) and, if evictions are allowed, marks each one's record
lapsed (the first stage of expiry, seen by every replica as ``lease_ok`` false); a
record lapsed for ``removal_grace`` is deleted (the second). In self-preservation the
overdue are left as they are, listed and routable, and the leader writes the state to
the ``preservation`` key for every replica to show.

Every write is a transaction that holds only if this replica still leads (its
election fence), the alive key is still absent (the instance did not come back) and
the record is the one the decision was made on: two replicas never both evict, and
nothing is evicted on a stale view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from registry_service.config import RegistryConfig
from registry_service.election import Election
from registry_service.etcd import Compare, Delete, EtcdClient, Op, Put
from registry_service.mirror import Mirror
from registry_service.model import Instance, LoadReport, ServingStatus
from registry_service.preservation import SelfPreservation
from registry_service.records import (
    Keys,
    PreservationState,
    encode_preservation,
    encode_record,
    parse_lease,
)

__all__ = ["Loads", "Sweeper", "each"]

logger = logging.getLogger(__name__)

# Transactions in flight at once, so that a mass lapse is neither serial nor a flood.
BATCH = 64
# How long a sweep waits to see its own writes, so the next one decides on them.
SETTLE = 2.0


@dataclass(slots=True)
class _Published:
    """What this replica last wrote of an instance's load, and what waits to be."""

    lease: int
    at: float = float("-inf")
    pending: LoadReport | None = None


# Puts an instance's record while the lease is its live one: the revision, or None.
Write = Callable[[Instance, int], Awaitable[int | None]]


class Loads:
    """Per instance heartbeating through this replica: its last load written, and when."""

    def __init__(
        self,
        config: RegistryConfig,
        mirror: Mirror,
        write: Write,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = config.load_publish_interval
        self._mirror = mirror
        self._write = write
        self._clock = clock
        self._held: dict[str, _Published] = {}

    def registered(self, instance_id: str, lease: int) -> None:
        self._held[instance_id] = _Published(lease)

    def forget(self, instance_id: str) -> None:
        self._held.pop(instance_id, None)

    def offer(self, inst: Instance, lease: int, status: ServingStatus, load: LoadReport) -> bool:
        """A heartbeat's report: True if it is to be written now, else it waits."""
        now = self._clock()
        published = self._held.get(inst.instance_id)
        if published is None or published.lease != lease:
            published = self._held[inst.instance_id] = _Published(lease)
        if status is not inst.status or (
            load != inst.load and now - published.at >= self._interval
        ):
            published.at, published.pending = now, None
            return True
        published.pending = load if load != inst.load else None
        return False

    async def flush(self) -> None:
        """Write the loads that came too soon after the last one written."""
        due = self._clock() - self._interval
        ready = []
        for instance_id, published in list(self._held.items()):
            inst = self._mirror.instance_of_lease(published.lease)
            if inst is None or inst.instance_id != instance_id:
                del self._held[instance_id]  # gone, lapsed or registered again
            elif published.pending is not None and published.at <= due:
                ready.append(instance_id)

        async def publish(instance_id: str) -> bool:
            published = self._held[instance_id]
            inst = self._mirror.instance_of_lease(published.lease)
            load, published.pending = published.pending, None
            if inst is None or load is None or load == inst.load:
                return False
            published.at = self._clock()
            return await self._write(replace(inst, load=load), published.lease) is not None

        await each(ready, publish)


class Sweeper:
    """What the leader does each sweep; a replica that does not lead does nothing."""

    def __init__(
        self,
        config: RegistryConfig,
        client: EtcdClient,
        keys: Keys,
        mirror: Mirror,
        election: Election,
    ) -> None:
        self._config = config
        self._client = client
        self._keys = keys
        self._mirror = mirror
        self._election = election
        # The decision's memory (recent lapses, since when): made on taking the lead.
        self._preservation: SelfPreservation | None = None
        self._written = 0

    async def sweep(self) -> None:
        if not self._election.leader:
            self._preservation = None
            return
        mirror = self._mirror
        preservation = self._preservation or self._take_over()
        now = mirror.now()
        overdue = mirror.overdue()
        allow = preservation.allow_evictions(now, overdue, len(mirror))
        await self._publish(preservation, now)
        if not allow:
            return
        grace = self._config.removal_grace
        lapsed = await each(overdue, self._lapse)
        mirror.stats.lapses += lapsed
        expired = [instance_id for instance_id, at in mirror.lapsed() if now - at >= grace]
        mirror.stats.removals += await each(expired, self._remove)
        await mirror.wait_for(self._written, SETTLE)

    def _take_over(self) -> SelfPreservation:
        """A fresh decision, carrying on from the state the last leader wrote."""
        cfg = self._config
        made = self._preservation = SelfPreservation(
            share=cfg.preservation_share,
            window=cfg.preservation_window,
            max_duration=cfg.preservation_max,
            min_instances=cfg.preservation_min_instances,
        )
        shown = self._mirror.preservation
        made.entered_total = shown.entered_total
        if shown.active:
            now = self._mirror.now()
            made.carry_on(shown.seconds_active(now), shown.reason, now)
        return made

    async def _publish(self, preservation: SelfPreservation, now: float) -> None:
        shown = self._mirror.preservation.state
        if (preservation.active, preservation.entered_total) == (
            shown.active,
            shown.entered_total,
        ):
            return
        state = PreservationState(
            active=preservation.active,
            reason=preservation.reason,
            since=time.time() - preservation.seconds_active(now),
            entered_total=preservation.entered_total,
        )
        key = self._keys.preservation
        await self._fenced([], [Put(key, encode_preservation(state))])

    async def _lapse(self, instance_id: str) -> bool:
        inst = self._mirror.get(instance_id)
        lease = None if inst is None else parse_lease(inst.lease_id)
        if inst is None or lease is None:
            return False
        record = encode_record(inst, lease, lapsed_at=time.time())
        key = self._keys.record(instance_id)
        return await self._fenced(self._unchanged(instance_id, inst.revision), [Put(key, record)])

    async def _remove(self, instance_id: str) -> bool:
        inst = self._mirror.get(instance_id)
        if inst is None:
            return False
        key = self._keys.record(instance_id)
        return await self._fenced(self._unchanged(instance_id, inst.revision), [Delete(key)])

    def _unchanged(self, instance_id: str, revision: int) -> list[Compare]:
        """The instance is still gone, and its record is as it was at ``revision``."""
        return [
            Compare.absent(self._keys.alive(instance_id)),
            Compare.mod_revision(self._keys.record(instance_id), revision),
        ]

    async def _fenced(self, compare: list[Compare], ops: list[Op]) -> bool:
        if not self._election.leader:
            return False  # lost the lead during this sweep: stop at once
        result = await self._client.txn([self._election.fence(), *compare], ops)
        if result.succeeded:
            self._written = max(self._written, result.revision)
        return result.succeeded


async def each(ids: Sequence[str], act: Callable[[str], Awaitable[bool]]) -> int:
    """Run ``act`` on each id, ``BATCH`` at a time; how many took effect."""
    done = 0
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        # Every one finishes before an error goes up: none is left running behind.
        results = await asyncio.gather(*(act(i) for i in batch), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        done += sum(1 for result in results if result)
    return done
