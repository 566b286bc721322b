"""What keeps a ``Mirror`` current: one list of the prefix, then a watch from after it.

The watch is opened again whenever it breaks (a member died, the connection dropped,
or it was silent past ``WATCH_IDLE``), with the shared backoff, from the revision
after the last one applied, so nothing is missed and nothing applied twice. A watch
can also go quiet without breaking: its member cut off by a network that drops
packets sends nothing, not even the end of the stream that etcd's require-leader
option would send. So the feed also asks etcd, by a quorum read, whether keys under
the prefix changed after the mirror's revision: every ``CHECK`` seconds, and at once
when a write of this replica did not reach the mirror (``suspect``). Changes the
watch did not bring on two checks in a row mean it is stale: it is opened again, on
the member the read reached. If etcd has compacted its history past that revision,
the prefix is listed again and the mirror hands on the differences. Meanwhile the
mirror keeps answering reads with what it has: fail-static.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from registry_service.etcd import Compacted, EtcdClient, EtcdError, WatchEvent
from registry_service.mirror import Mirror
from registry_service.records import Keys
from shoal_core.backoff import Attempts, Backoff
from shoal_core.lifecycle import stop_task

__all__ = ["Feed"]

logger = logging.getLogger(__name__)

RECONNECT = Backoff(initial=0.2, maximum=5.0)
# A watch silent this long is taken for dead and opened again. etcd's progress
# notifications (--experimental-watch-progress-notify-interval: 10 min by default, so
# set it to seconds) keep a quiet prefix's watch talking, and move the revision on.
WATCH_IDLE = 60.0
# How often the feed checks that the watch still brings what etcd has.
CHECK = 5.0


class Feed:
    """Lists ``keys.prefix`` into ``mirror`` on ``start``, then follows it until ``close``."""

    def __init__(self, client: EtcdClient, keys: Keys, mirror: Mirror) -> None:
        self._client = client
        self._keys = keys
        self._mirror = mirror
        self._task: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None
        self._suspect = asyncio.Event()

    async def start(self) -> None:
        self._mirror.epoch = f"{await self._client.cluster_id():x}"
        self._mirror.reset(*await self._client.range_prefix(self._keys.prefix))
        self._task = asyncio.create_task(self._follow(), name="etcd-backend-feed")
        self._guard = asyncio.create_task(self._check(), name="etcd-backend-feed-check")

    async def close(self) -> None:
        await stop_task(self._guard)
        await stop_task(self._task)
        self._guard = self._task = None

    def suspect(self) -> None:
        """A write went to etcd and the mirror did not show it in time: check now."""
        self._suspect.set()

    async def _check(self) -> None:
        unseen_at: int | None = None  # the mirror's revision when changes were unseen
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._suspect.wait(), CHECK)
            self._suspect.clear()
            seen = self._mirror.revision
            try:
                unseen = await self._client.count_changed(self._keys.prefix, seen)
            except EtcdError:
                continue  # etcd unreachable: the watch says so itself
            if not unseen or seen != unseen_at:
                # Nothing missed, or the watch moved on since: it may just be in flight.
                unseen_at = seen if unseen else None
                continue
            logger.warning(
                "registry mirror: etcd has %d changes after revision %d that the watch did "
                "not bring; opening it again",
                unseen,
                seen,
            )
            unseen_at = None
            await stop_task(self._task)
            self._task = asyncio.create_task(self._follow(), name="etcd-backend-feed")

    async def _follow(self) -> None:
        mirror = self._mirror
        attempts = Attempts(RECONNECT)
        relist = False
        while True:
            try:
                if relist:
                    mirror.reset(*await self._client.range_prefix(self._keys.prefix))
                    relist = False
                watch = self._client.watch(
                    self._keys.prefix, start_revision=mirror.revision + 1, idle_timeout=WATCH_IDLE
                )
                async with contextlib.aclosing(watch):
                    async for item in watch:
                        attempts.succeeded()
                        if isinstance(item, WatchEvent):
                            mirror.apply(item)
                        mirror.advance(item.revision)
            except Compacted as exc:
                logger.warning("registry mirror behind etcd's history (%s): listing again", exc)
                relist = True
            except EtcdError as exc:
                pause = attempts.failed()
                logger.warning("registry mirror: etcd watch broke (%s); again in %.1fs", exc, pause)
                await asyncio.sleep(pause)
            except Exception:
                # A bug in applying a change must not freeze the mirror: start it afresh.
                logger.exception("registry mirror: applying a change failed; listing again")
                relist = True
                await asyncio.sleep(attempts.failed())
