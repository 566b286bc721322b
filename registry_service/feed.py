"""What keeps a ``Mirror`` current: one list of the prefix, then a watch from after it.

The watch is opened again whenever it breaks (a member died, the connection dropped,
or it was silent past ``WATCH_IDLE``), with the shared backoff, from the revision
after the last one applied, so nothing is missed and nothing applied twice. If etcd
has compacted its history past that revision, the prefix is listed again and the
mirror hands on the differences. Meanwhile the mirror keeps answering reads with what
it has: fail-static.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from registry_service.etcd import Compacted, EtcdClient, EtcdError, WatchEvent
from registry_service.mirror import Mirror
from registry_service.records import Keys
from shoal_core.backoff import Attempts, Backoff

__all__ = ["Feed", "stop"]

logger = logging.getLogger(__name__)

RECONNECT = Backoff(initial=0.2, maximum=5.0)
# A watch silent this long is taken for dead and opened again. etcd's progress
# notifications (--experimental-watch-progress-notify-interval: 10 min by default, so
# set it to seconds) keep a quiet prefix's watch talking, and move the revision on.
WATCH_IDLE = 60.0


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Feed:
    """Lists ``keys.prefix`` into ``mirror`` on ``start``, then follows it until ``close``."""

    def __init__(self, client: EtcdClient, keys: Keys, mirror: Mirror) -> None:
        self._client = client
        self._keys = keys
        self._mirror = mirror
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._mirror.epoch = f"{await self._client.cluster_id():x}"
        self._mirror.reset(*await self._client.range_prefix(self._keys.prefix))
        self._task = asyncio.create_task(self._follow(), name="etcd-backend-feed")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

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
