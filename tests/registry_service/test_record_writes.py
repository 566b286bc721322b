"""RecordWrites against a real etcd: heartbeats' writes to few transactions, each write
guarded by its own instance's lease."""

from __future__ import annotations

import asyncio
import uuid

from registry_service.batch import BATCH, RecordWrites
from registry_service.etcd import EtcdClient
from registry_service.model import Instance, InstanceSpec, LoadReport
from registry_service.records import Keys, read_record
from tests.etcd_cluster import EtcdCluster, etcd_cluster_fixture, requires_etcd  # noqa: F401

pytestmark = requires_etcd


def instance(n: int, in_flight: int = 0) -> Instance:
    spec = InstanceSpec(f"w-{n}", "echo", f"127.0.0.1:{10_000 + n}")
    return Instance(spec, "", 10.0, load=LoadReport(in_flight=in_flight))


async def test_writes_waiting_together_go_as_one_transaction_each_guarded_by_its_lease(
    etcd_cluster: EtcdCluster,
) -> None:
    keys = Keys(f"/test/writes-{uuid.uuid4().hex[:8]}/".encode())
    async with EtcdClient(etcd_cluster.endpoints, timeout=5.0) as client:
        count = BATCH + 20  # more than one transaction holds
        leases = [(await client.grant(30)).id for _ in range(count)]
        for n, lease in enumerate(leases):
            await client.put(keys.alive(f"w-{n}"), b"", lease=lease)
        await client.revoke(leases[3])  # its alive key goes: its write must not land
        writes = RecordWrites(client, keys)
        try:
            # Instance 5 twice at once: the later record is the one left.
            results = await asyncio.gather(
                *(writes.put(instance(n, in_flight=1), lease) for n, lease in enumerate(leases)),
                writes.put(instance(5, in_flight=2), leases[5]),
            )
        finally:
            await writes.aclose()
    landed = [r for r in results if r is not None]
    assert results[3] is None
    assert len(landed) == count, results  # all but instance 3's; instance 5's twice
    # The first write went alone; the rest waited for it and went together, BATCH at
    # most to a transaction, each transaction at a revision of its own.
    assert 2 <= len(set(landed)) <= 1 + -(-(count - 1) // BATCH), sorted(set(landed))
    async with EtcdClient(etcd_cluster.endpoints, timeout=5.0) as client:
        assert await client.get(keys.record("w-3")) is None
        kv = await client.get(keys.record("w-5"))
    assert kv is not None
    record = read_record(kv.value)
    assert record is not None and record.instance.load.in_flight == 2
    assert record.lease == leases[5]
