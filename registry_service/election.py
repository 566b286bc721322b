"""Which replica sweeps: the one whose lease the ``leader`` key is bound to.

Each replica holds a lease of its own (``TTL`` seconds, renewed every ``RENEW``) and
campaigns with one transaction: create the key, bound to that lease, if nobody has it.
The key goes when the leader closes (it revokes its lease) or stops renewing (etcd
ends the lease), and the others, seeing that in their mirrors, campaign at once.

``leader`` is this replica's belief, and it gives up at once what it cannot vouch
for: the mirror shows the key bound to another lease, the lease has ended, or it has
not been renewed for a TTL. Belief is not what keeps two replicas from both evicting:
every write the leader makes is a transaction that compares the key's lease with its
own (``fence``), so a stale leader's writes fail in etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from registry_service.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    LeaseNotFound,
    Put,
    Range,
)
from shoal_core.lifecycle import stop_task

__all__ = ["Election"]

logger = logging.getLogger(__name__)

TTL = 5
RENEW = 1.0


class Election:
    """This replica's candidacy for the ``key``, under ``name``."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        *,
        name: str,
        ttl: int = TTL,
        renew: float = RENEW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._key = key
        self.name = name
        self._ttl = ttl
        self._renew = renew
        self._clock = clock
        self.lease = 0
        self._renewed_at = float("-inf")
        self._holds = False
        self._vacant = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def leader(self) -> bool:
        return self._holds and self._clock() - self._renewed_at < self._ttl

    def fence(self) -> Compare:
        """The compare that makes a transaction fail unless this replica leads."""
        return Compare(self._key, "LEASE", self.lease)

    def seen(self, holder: int | None) -> None:
        """The mirror saw the key change: bound to ``holder`` now, or gone (None)."""
        self._hold(holder is not None and holder == self.lease, "the key moved on")
        if holder is None:
            self._vacant.set()

    def _hold(self, holds: bool, why: str = "") -> None:
        # The mirror may show a campaign's own write before its reply comes: whichever
        # comes first says it.
        if holds and not self._holds:
            logger.info("replica %s leads the registry's sweep", self.name)
        elif self._holds and not holds:
            logger.warning("replica %s no longer leads the registry's sweep: %s", self.name, why)
        self._holds = holds

    async def start(self) -> None:
        await self._new_lease()
        await self._campaign()
        self._task = asyncio.create_task(self._run(), name="etcd-backend-election")

    async def close(self) -> None:
        """Stop renewing and give the key up at once (revoking the lease deletes it)."""
        await stop_task(self._task)
        self._task = None
        self._holds = False
        # Let go of the lease first, so that what the mirror shows meanwhile (a campaign
        # cut short may still have won) cannot make this replica the leader again.
        lease, self.lease = self.lease, 0
        if lease:
            with contextlib.suppress(EtcdError):
                await self._client.revoke(lease)

    async def _new_lease(self) -> None:
        # Timed from the request, not the reply: etcd started the TTL in between.
        sent = self._clock()
        self.lease = (await self._client.grant(self._ttl)).id
        self._renewed_at = sent

    async def _campaign(self) -> None:
        self._vacant.clear()
        result = await self._client.txn(
            [Compare.absent(self._key)],
            [Put(self._key, self.name.encode(), self.lease)],
            [Range(self._key)],
        )
        held = [] if result.succeeded else result.responses[0]
        holder = held[0].lease if isinstance(held, list) and held else 0
        # A put that went through although its reply was lost shows as our own lease.
        if result.succeeded or holder == self.lease:
            self._hold(True)

    async def _run(self) -> None:
        next_renewal = self._clock() + self._renew
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_renewal - self._clock())):
                    await self._vacant.wait()
            try:
                if self._clock() >= next_renewal:
                    next_renewal = self._clock() + self._renew
                    await self._keep()
                if self._vacant.is_set():
                    await self._campaign()
            except EtcdError as exc:
                # Renewals go on; without one for a TTL, `leader` turns false by itself.
                logger.warning("replica %s: etcd: %s", self.name, exc)
                await asyncio.sleep(self._renew / 4)

    async def _keep(self) -> None:
        sent = self._clock()
        try:
            await self._client.keepalive(self.lease)
        except LeaseNotFound:
            # Not renewed in time (a long pause, or etcd away longer than the TTL).
            self._hold(False, "its lease ended")
            await self._new_lease()
            self._vacant.set()
            return
        self._renewed_at = sent
