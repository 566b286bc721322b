"""Record writes that heartbeats cause, many to one etcd transaction.

A heartbeat whose status or load changed writes the instance's record, guarded by
its lease (the write holds only while that lease is the instance's). At a thousand
instances whose load moves at every heartbeat that is hundreds of writes a second;
sent as a transaction each, their HTTP round trips were most of a replica's CPU and
each a raft proposal in etcd. ``RecordWrites`` sends the writes that came while one
transaction was out as the next one, each as a nested transaction of its own so that
one instance's ended lease fails only its own write: group commit, with no timer, so a
lone write goes at once and a busy registry sends fewer, larger transactions.

The records of one transaction share its revision; watchers get them as one change
(see ``History`` and ``wire.merged``). Two writes of one instance that wait together
are one: the later record wins, as writing both in turn would have left it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from registry_service.etcd import Compare, EtcdClient, Put
from registry_service.etcd.client import MAX_TXN_OPS
from registry_service.model import Instance
from registry_service.records import Keys, encode_record
from shoal_core.lifecycle import stop_task

__all__ = ["BATCH", "RecordWrites"]

# Nested transactions per transaction: under etcd's op limit, and a few dozen kB.
BATCH = min(64, MAX_TXN_OPS)


@dataclass(slots=True)
class _Write:
    value: bytes
    lease: int
    waiters: list[asyncio.Future[int | None]] = field(default_factory=list)


class RecordWrites:
    """Lease-guarded record writes through ``client``, batched while one is out."""

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._waiting: dict[str, _Write] = {}
        self._sender: asyncio.Task[None] | None = None

    async def put(self, inst: Instance, lease: int) -> int | None:
        """Write ``inst``'s record while ``lease`` is its live lease: the revision of
        the write, or None when the lease has ended. Raises what etcd raised."""
        waiter: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        value = encode_record(inst, lease)
        write = self._waiting.get(inst.instance_id)
        if write is None:
            write = self._waiting[inst.instance_id] = _Write(value, lease)
        else:
            write.value, write.lease = value, lease
        write.waiters.append(waiter)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="registry-record-writes")
        return await waiter

    async def _send(self) -> None:
        while self._waiting:
            batch = [
                (instance_id, self._waiting.pop(instance_id))
                for instance_id in list(self._waiting)[:BATCH]
            ]
            items = [
                (
                    [Compare(self._keys.alive(instance_id), "LEASE", write.lease)],
                    [Put(self._keys.record(instance_id), write.value)],
                )
                for instance_id, write in batch
            ]
            try:
                held, revision = await self._client.txn_each(items)
            except asyncio.CancelledError:
                _fail(batch, None)
                raise
            except Exception as exc:  # each waiter gets etcd's error; the next batch goes on
                _fail(batch, exc)
                continue
            for (_, write), ok in zip(batch, held, strict=True):
                for waiter in write.waiters:
                    if not waiter.done():
                        waiter.set_result(revision if ok else None)

    async def aclose(self) -> None:
        """Stop sending; writes still waiting are cancelled."""
        sender, self._sender = self._sender, None
        await stop_task(sender)
        _fail(list(self._waiting.items()), None)
        self._waiting.clear()


def _fail(batch: list[tuple[str, _Write]], exc: Exception | None) -> None:
    """Give every waiter of ``batch`` ``exc``; None cancels them."""
    for _, write in batch:
        for waiter in write.waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.cancel()
            else:
                waiter.set_exception(exc)
