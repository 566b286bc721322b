"""Endpoints from the registry's Watch stream, kept through registry outages.

The stream gives a snapshot, then one event per change. When it breaks, the
table keeps its last good set (fail-static) and the watch reconnects, to the next
registry replica when there are several, with exponential backoff and jitter,
resuming after the last revision seen so the registry can replay what was missed
(or send a fresh snapshot). Replicas over one store share revisions, so a watch that
moves gets the missed events, not a snapshot. Which of the two each re-established
watch got is counted in ``restarts``, judged by its first message: a SNAPSHOT means it
started again from scratch, anything else (a missed event, a change, progress) that it
resumed. The first snapshot of the sidecar's life is no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence

from protos import registry_pb2 as pb
from proxy_sidecar.config import DiscoverySettings
from proxy_sidecar.endpoints import EndpointTable, InstanceInfo
from proxy_sidecar.rpc import Follower, Rpc
from shoal_core.backoff import Attempts, Backoff
from shoal_core.replicas import Replicas

__all__ = ["RESTART_OUTCOMES", "Discovery", "info_from_pb"]

logger = logging.getLogger(__name__)

_ROUTABLE_STATUS = (pb.SERVING, pb.SERVING_STATUS_UNSPECIFIED)
_WATCH = "/shoal.registry.v1.Registry/Watch"
# How often held empty sets are re-examined when no event arrives.
_TICK = 0.5
# How a re-established watch went on: from the revision it had, or from a snapshot.
RESTART_OUTCOMES = ("resumed", "snapshot")


def info_from_pb(msg: pb.Instance) -> InstanceInfo:
    load = msg.load
    return InstanceInfo(
        instance_id=msg.instance_id,
        address=msg.address,
        service=msg.service,
        grpc_services=tuple(msg.grpc_services),
        weight=msg.weight or 100,
        zone=msg.zone,
        routable=msg.healthy and msg.status in _ROUTABLE_STATUS,
        load_in_flight=load.in_flight,
        load_queue_depth=load.queue_depth,
        load_cpu_percent=load.cpu_percent,
    )


class Discovery:
    """Consumes ``Registry.Watch`` from ``registry`` (one address, several, or replicas
    shared with other users) into an ``EndpointTable``; owns its tasks."""

    def __init__(
        self,
        registry: str | Sequence[str] | Replicas,
        table: EndpointTable,
        settings: DiscoverySettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._replicas = replicas = Replicas.of(registry)
        self._table = table
        self._settings = settings
        attempts = Attempts(
            Backoff(initial=settings.backoff_initial, maximum=settings.backoff_max),
            rng or random.Random(),
        )
        self._follower = Follower(replicas, _WATCH, pb.WatchEvent, attempts, "registry's watch")
        self._ticker: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self.revision = 0
        self.epoch = ""
        self.events = 0
        self.last_event_at = 0.0
        # Re-established watches by outcome; ``_judged`` is the follower's count of
        # breaks when the stream under way got its first message (-1: none yet).
        self.restarts = dict.fromkeys(RESTART_OUTCOMES, 0)
        self._judged = -1

    async def start(self, rpc: Rpc) -> None:
        """Start watching through ``rpc``; wait up to ``initial_sync`` seconds for the
        first snapshot."""
        self._follower.start(
            rpc,
            lambda: pb.WatchRequest(since_revision=self.revision),
            self._apply,
            lambda: f"keeping the last {len(self._table.endpoints())} endpoints",
        )
        self._ticker = asyncio.create_task(self._tick(), name="discovery-tick")
        try:
            await asyncio.wait_for(self._synced.wait(), self._settings.initial_sync)
        except TimeoutError:
            logger.warning(
                "no snapshot from the registry at %s yet; serving and retrying",
                self._replicas.current,
            )

    @property
    def connected(self) -> bool:
        return self._follower.connected

    @property
    def reconnects(self) -> int:
        return self._follower.reconnects

    def _apply(self, event: pb.WatchEvent) -> None:
        if (stream := self._follower.reconnects) != self._judged:
            self._judged = stream
            if self._synced.is_set():
                self._restarted(event)
        self.events += 1
        self.last_event_at = time.monotonic()
        if event.registry_epoch != self.epoch and self.epoch:
            logger.info("the registry restarted (epoch %s)", event.registry_epoch)
        self.epoch = event.registry_epoch
        kind = event.type
        if kind == pb.WatchEvent.SNAPSHOT:
            self._table.replace(info_from_pb(i) for i in event.instances)
            self._synced.set()
            # A snapshot starts the story afresh at its revision: one from a replica of
            # another store (or another history) may stand lower than what we had.
            self.revision = event.revision
        elif kind == pb.WatchEvent.UPSERT:
            for inst in event.instances:
                self._table.upsert(info_from_pb(inst))
        elif kind == pb.WatchEvent.REMOVE:
            for inst in event.instances:
                self._table.remove(inst.instance_id)
        if event.revision > self.revision:
            self.revision = event.revision

    def _restarted(self, first: pb.WatchEvent) -> None:
        """Count the watch just re-established by its ``first`` message."""
        if first.type == pb.WatchEvent.SNAPSHOT:
            self.restarts["snapshot"] += 1
            logger.info("the registry's watch started again from a snapshot")
        else:
            self.restarts["resumed"] += 1
            logger.info("the registry's watch resumed after revision %d", self.revision)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self._table.tick()

    async def close(self) -> None:
        await self._follower.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
