"""The registry's state in etcd: ``EtcdBackend``, for any number of replicas over one
cluster, each answering any call.

Reads come from this replica's ``Mirror`` of etcd (``view``). Writes go to etcd as
transactions (see ``registry_service.records`` for the keys), and return once the
mirror shows them, so a caller reads its own write from the same replica:

- register: grant an etcd lease (the TTL rounded up to whole seconds, as etcd counts);
  put the record and the alive key bound to the lease, in one transaction that holds
  only if the instance is as the decision saw it (no live lease at another address);
  revoke the lease it replaces.
- heartbeat: renew the lease (a keepalive, not a write, over one gRPC stream: see
  ``etcd.keepalive``). A change of status is written at once; a change of load at most
  once per ``load_publish_interval`` per instance from this replica, the rest by the
  periodic task, as the memory store does. Writes that wait together go as one
  transaction (``batch``), their records at one revision.
- deregister: delete the record and the alive key in one transaction, then revoke.

A lease the mirror does not know (or knows lapsed) is not found: the servicer checks
who may touch a lease by the same view, so acting on one it did not check would
bypass that. The mirror is milliseconds behind etcd, and a first heartbeat comes a
third of a TTL after its register.

etcd traffic per instance in steady state, TTL 10 s, heartbeats every TTL/3: 18
keepalives a minute (etcd renews leases on its leader, outside the raft log), and no
write while status and load stay the same; a load that differs at every heartbeat is
written at most min(18, 60 / load_publish_interval) times a minute (18 at the default
1 s: raise the interval to cut it). Each replica adds 60 keepalives a minute for its
election lease. A lapse costs one write, a removal one.

When etcd cannot be reached, writes raise ``StoreUnavailable`` and reads keep
answering from the mirror (fail-static); ``start`` raises it when etcd does not answer
within ``start_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

from registry_service.batch import RecordWrites
from registry_service.config import RegistryConfig
from registry_service.election import Election
from registry_service.errors import AlreadyExists, LeaseNotFound, StoreUnavailable
from registry_service.etcd import Compare, Delete, EtcdClient, EtcdError, KeyValue, Put, Range
from registry_service.etcd import LeaseNotFound as EtcdLeaseNotFound
from registry_service.etcd.model import TxnResult
from registry_service.feed import Feed
from registry_service.mirror import Mirror
from registry_service.model import Instance, InstanceSpec, LoadReport, ServingStatus
from registry_service.records import Keys, encode_record, lease_text, parse_lease, read_record
from registry_service.store import StoreStats
from registry_service.sweep import Loads, Sweeper
from registry_service.table import check_room
from shoal_core.lifecycle import stop_task

__all__ = ["EtcdBackend"]

logger = logging.getLogger(__name__)

# How long a write waits for the mirror to show it before returning without that.
SETTLE = 2.0
# Transactions a write tries before giving up on an instance that keeps changing.
TRIES = 5


@contextlib.contextmanager
def _reaching_etcd() -> Iterator[None]:
    try:
        yield
    except EtcdError as exc:
        raise StoreUnavailable(f"the registry's etcd cannot be reached: {exc}") from exc


def _kvs(result: TxnResult, index: int) -> list[KeyValue]:
    found = result.responses[index]
    return found if isinstance(found, list) else []


def _refuse_takeover(spec: InstanceSpec, held: Instance | None, alive: int) -> None:
    if held is not None and alive and held.spec.address != spec.address:
        raise AlreadyExists(
            f"instance {spec.instance_id!r} is registered from {held.spec.address} "
            f"with a live lease; {spec.address} cannot take it over"
        )


class EtcdBackend:
    """The registry's state under ``prefix`` in the etcd that ``client`` reaches."""

    def __init__(
        self,
        config: RegistryConfig,
        client: EtcdClient,
        *,
        prefix: bytes = b"/shoal/registry/",
        clock: Callable[[], float] = time.monotonic,
        start_timeout: float = 10.0,
        name: str = "",
    ) -> None:
        self.config = config
        self._client = client
        self._keys = Keys(prefix)
        self._clock = clock
        self._start_timeout = start_timeout
        self.stats = StoreStats()
        self._mirror = Mirror(config, self._keys, stats=self.stats, clock=clock)
        self._feed = Feed(client, self._keys, self._mirror)
        name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.election = Election(client, self._keys.leader, name=name, clock=clock)
        self._mirror.on_leader = self.election.seen
        self._sweeper = Sweeper(config, client, self._keys, self._mirror, self.election)
        self._writes = RecordWrites(client, self._keys)
        self._loads = Loads(config, self._mirror, self._writes.put, clock=clock)
        # Registrations between the limits check and the mirror: counted against limits.
        self._coming: list[InstanceSpec] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def view(self) -> Mirror:
        return self._mirror

    async def start(self) -> None:
        """List and watch the prefix, campaign, and start sweeping."""
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._feed.start()
                await self.election.start()
        except (EtcdError, TimeoutError) as exc:
            await self.close()
            where = ", ".join(self._client.endpoints)
            raise StoreUnavailable(
                f"etcd ({where}) did not answer within {self._start_timeout:g}s: {exc}"
            ) from exc
        self._task = asyncio.create_task(self._tend(), name="etcd-backend-sweep")

    async def close(self) -> None:
        """Stop sweeping, hand the lead on, stop following; the client stays open."""
        await stop_task(self._task)
        self._task = None
        await self._writes.aclose()
        await self.election.close()
        await self._feed.close()

    async def register(
        self, spec: InstanceSpec, ttl_requested: float, status: ServingStatus
    ) -> Instance:
        mirror = self._mirror
        check_room(self.config, mirror, spec, self._coming)
        held = mirror.get(spec.instance_id)
        alive = mirror.alive_lease(spec.instance_id)
        _refuse_takeover(spec, held, alive)
        ttl = self.config.clamp_ttl(ttl_requested)
        made = Instance(spec, "", ttl, status)
        self._coming.append(spec)
        try:
            with _reaching_etcd():
                lease = (await self._client.grant(max(1, math.ceil(ttl)))).id
                made = replace(made, lease_id=lease_text(lease))
                try:
                    revision, replaced = await self._claim(made, lease, held, alive)
                except BaseException:
                    with contextlib.suppress(EtcdError):
                        await self._client.revoke(lease)
                    raise
            if replaced:
                with contextlib.suppress(EtcdError):  # with no key left, it ends by itself
                    await self._client.revoke(replaced)
            self.stats.registrations += 1
            self._loads.registered(spec.instance_id, lease)
            return await self._settled(made, revision)
        finally:
            # Counted against the limits until the mirror shows it (or could have).
            self._coming.remove(spec)

    async def _claim(
        self, made: Instance, lease: int, held: Instance | None, alive: int
    ) -> tuple[int, int]:
        """Write ``made`` if its record and alive key are still as seen; return the
        revision of the write and the live lease it replaced (0: none)."""
        instance_id = made.instance_id
        record, alive_key = self._keys.record(instance_id), self._keys.alive(instance_id)
        value = encode_record(made, lease)
        mod = 0 if held is None else held.revision
        for _ in range(TRIES):
            result = await self._client.txn(
                [Compare.mod_revision(record, mod), Compare(alive_key, "LEASE", alive)],
                [Put(record, value), Put(alive_key, b"", lease)],
                [Range(record), Range(alive_key)],
            )
            if result.succeeded:
                return result.revision, alive
            records, alives = _kvs(result, 0), _kvs(result, 1)
            # A value that is no registry's record is ours to overwrite.
            found = read_record(records[0].value) if records else None
            if found is not None and found.lease == lease:
                return records[0].mod_revision, alive  # a retried write had gone through
            mod = records[0].mod_revision if records else 0
            alive = alives[0].lease if alives else 0
            _refuse_takeover(made.spec, None if found is None else found.instance, alive)
        raise StoreUnavailable(
            f"instance {instance_id!r} kept changing while registering it; try again"
        )

    async def heartbeat(self, lease_id: str, status: ServingStatus, load: LoadReport) -> Instance:
        lease = parse_lease(lease_id)
        inst = None if lease is None else self._mirror.instance_of_lease(lease)
        if inst is None or lease is None:
            raise self._not_found(lease_id)
        with _reaching_etcd():
            try:
                await self._client.keepalive(lease)
            except EtcdLeaseNotFound:
                raise self._not_found(lease_id) from None
        self.stats.heartbeats += 1
        self._mirror.renewed(inst.instance_id)
        if self._loads.offer(inst, lease, status, load):
            changed = replace(inst, status=status, load=load)
            with _reaching_etcd():
                revision = await self._writes.put(changed, lease)
            if revision is None:
                raise self._not_found(lease_id)
            return await self._settled(changed, revision)
        return inst

    def _not_found(self, lease_id: str) -> LeaseNotFound:
        self.stats.heartbeats_not_found += 1
        return LeaseNotFound(f"lease {lease_id!r} is unknown or expired; register again")

    async def deregister(self, lease_id: str) -> None:
        lease = parse_lease(lease_id)
        inst = None if lease is None else self._mirror.instance_of_lease(lease)
        if inst is None or lease is None:
            raise LeaseNotFound(f"lease {lease_id!r} is unknown or expired")
        record = self._keys.record(inst.instance_id)
        mod = inst.revision
        with _reaching_etcd():
            for _ in range(TRIES):
                result = await self._client.txn(
                    [Compare.mod_revision(record, mod)],
                    [Delete(record), Delete(self._keys.alive(inst.instance_id))],
                    [Range(record)],
                )
                if result.succeeded or not (records := _kvs(result, 0)):
                    break  # deleted (by this call's retried write, if gone already)
                found = read_record(records[0].value)
                if found is None or found.lease != lease or found.lapsed_at is not None:
                    raise LeaseNotFound(f"lease {lease_id!r} is unknown or expired")
                mod = records[0].mod_revision  # a load or status written meanwhile
            else:
                raise StoreUnavailable(f"instance {inst.instance_id!r} kept changing; try again")
            with contextlib.suppress(EtcdError):  # with no key left, it ends by itself
                await self._client.revoke(lease)
        self.stats.deregistrations += 1
        self._loads.forget(inst.instance_id)
        if not await self._mirror.wait_for(result.revision, SETTLE):
            self._feed.suspect()

    async def _settled(self, made: Instance, revision: int) -> Instance:
        """The instance as the mirror shows it at ``revision``, once it does (or
        ``made`` at that revision, if the mirror is slow or has moved on)."""
        if not await self._mirror.wait_for(revision, SETTLE):
            self._feed.suspect()
        seen = self._mirror.get(made.instance_id)
        if seen is not None and seen.revision == revision:
            return seen
        return replace(made, revision=revision)

    async def _tend(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                await self._loads.flush()
                await self._sweeper.sweep()
            except EtcdError as exc:
                logger.warning("registry sweep: etcd: %s", exc)
            except Exception:  # a sweep bug must not stop expiry for good
                logger.exception("registry sweep failed")
