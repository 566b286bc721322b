"""EtcdClient against a real 3-member etcd: keys, transactions, leases, watches, faults.

Most tests share one cluster (module-scoped) and keep to their own key prefix; those
that kill or restart members start a cluster of their own. Waits are bounded, and
nothing asserts how fast etcd is.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from registry_service.etcd import (
    Compacted,
    Compare,
    Delete,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    Put,
    Range,
    WatchProgress,
)
from registry_service.etcd.transport import JsonLines
from tests.etcd_cluster import (
    EtcdCluster,
    etcd_cluster_fixture,  # noqa: F401
    free_ports,
    next_events,
    requires_etcd,
)
from tests.proxy_sidecar.conftest import wait_for

pytestmark = requires_etcd


@pytest.fixture
async def client(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd_cluster.endpoints, timeout=5.0) as c:
        yield c


async def absent(client: EtcdClient, key: bytes) -> bool:
    return await client.get(key) is None


async def test_put_get_delete_round_trip_binary_keys_and_values(client: EtcdClient) -> None:
    key, value = b"\x00kv/\xff\x01", bytes(range(256))
    revision = await client.put(key, value)
    kv = await client.get(key)
    assert kv is not None and (kv.key, kv.value) == (key, value)
    assert kv.create_revision == kv.mod_revision == revision and kv.version == 1
    assert await client.put(key, b"") > revision
    assert (await client.get(key)).value == b""  # type: ignore[union-attr]
    assert await client.delete(key) == 1
    assert await absent(client, key)
    assert await client.delete(key) == 0


async def test_range_prefix_lists_in_key_order_as_of_a_revision(client: EtcdClient) -> None:
    # A prefix ending in 0xff: its range end is computed by carrying into the byte before.
    prefix = b"range/\xff"
    for name in (b"c", b"a", b"\xff\xff", b"b"):
        then = await client.put(prefix + name, name)
    await client.put(b"range0", b"next to the prefix, not in it")
    await client.delete(prefix + b"b")
    kvs, revision = await client.range_prefix(prefix)
    assert [kv.key for kv in kvs] == [prefix + b"a", prefix + b"c", prefix + b"\xff\xff"]
    assert revision > then
    old, old_revision = await client.range_prefix(prefix, revision=then)
    assert len(old) == 4 and old_revision == revision  # the header is always "now"
    first, _ = await client.range_prefix(prefix, limit=2)
    assert [kv.key for kv in first] == [prefix + b"a", prefix + b"c"]
    assert await client.delete_prefix(prefix) == 3
    assert (await client.range_prefix(prefix))[0] == []
    assert await client.get(b"range0") is not None


async def test_txn_create_if_absent_wins_once_among_racers(client: EtcdClient) -> None:
    key = b"txn/leader"

    async def claim(me: bytes) -> bool:
        result = await client.txn([Compare.absent(key)], [Put(key, me)], [Range(key)])
        return result.succeeded

    wins = await asyncio.gather(*(claim(b"racer-%d" % i) for i in range(2)))
    assert sorted(wins) == [False, True]
    held = await client.get(key)
    assert held is not None and held.value == b"racer-%d" % wins.index(True)
    lost = await client.txn([Compare.absent(key)], [Put(key, b"late")], [Range(key)])
    assert not lost.succeeded and lost.responses == [[held]]


async def test_txn_compare_mod_revision_and_value_guard_a_swap(client: EtcdClient) -> None:
    key = b"txn/cas"
    first = await client.put(key, b"1")
    swapped = await client.txn([Compare.mod_revision(key, first)], [Put(key, b"2")])
    assert swapped.succeeded and swapped.responses == [None] and swapped.revision > first
    stale = await client.txn([Compare.mod_revision(key, first)], [Put(key, b"3")])
    assert not stale.succeeded and stale.responses == []
    by_value = await client.txn([Compare.value_is(key, b"2")], [Delete(key)], [Range(key)])
    assert by_value.succeeded and by_value.responses == [1]
    assert await absent(client, key)
    with pytest.raises(TypeError):
        Compare(key, "VALUE", 1)


async def test_lease_keepalive_renews_and_expiry_deletes_bound_keys(client: EtcdClient) -> None:
    lease = await client.grant(2)
    assert lease.ttl >= 2
    await client.put(b"lease/instance", b"up", lease=lease.id)
    assert (await client.get(b"lease/instance")).lease == lease.id  # type: ignore[union-attr]
    assert await client.keepalive(lease.id) >= 2
    assert 0 <= await client.time_to_live(lease.id) <= lease.ttl

    # No more keepalives: etcd expires the lease, and the keys bound to it.
    await wait_for(lambda: absent(client, b"lease/instance"), 10)
    with pytest.raises(LeaseNotFound):
        await client.keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await client.time_to_live(lease.id)


async def test_revoke_deletes_bound_keys_at_once_and_unknown_leases_are_errors(
    client: EtcdClient,
) -> None:
    lease = await client.grant(30)
    await client.put(b"lease/revoked", b"up", lease=lease.id)
    await client.revoke(lease.id)
    assert await absent(client, b"lease/revoked")
    with pytest.raises(LeaseNotFound):
        await client.revoke(lease.id)
    with pytest.raises(LeaseNotFound):  # etcd's own refusal: no failover, no EtcdUnavailable
        await client.put(b"lease/unbound", b"x", lease=lease.id)


async def test_watch_replays_missed_events_in_order_then_live_ones(client: EtcdClient) -> None:
    prefix = b"watch/replay/"
    start = await client.put(prefix + b"a", b"1")
    await client.put(prefix + b"a", b"2")
    await client.put(b"watch/elsewhere", b"not watched")
    deleted_at = await client.put(prefix + b"b", b"3") + 1
    await client.delete(prefix + b"a")
    async with contextlib.aclosing(client.watch(prefix, start_revision=start)) as watch:
        missed = await next_events(watch, 4)
        live_at = await client.put(prefix + b"c", b"4")
        live = await next_events(watch, 1)
    assert [e.type for e in missed] == ["PUT", "PUT", "PUT", "DELETE"]
    assert [e.kv.key[-1:] + e.kv.value for e in missed] == [b"a1", b"a2", b"b3", b"a"]
    revisions = [e.revision for e in missed]
    assert revisions == sorted(revisions) and revisions[0] == start
    assert revisions[-1] == deleted_at
    assert missed[1].prev_kv is not None and missed[1].prev_kv.value == b"1"
    assert missed[3].prev_kv is not None and missed[3].prev_kv.value == b"2"
    assert [(e.kv.key, e.revision) for e in live] == [(prefix + b"c", live_at)]


async def test_watch_reports_progress_on_a_quiet_prefix(client: EtcdClient) -> None:
    # The test cluster asks etcd for a progress notification every second.
    now = await client.put(b"watch/progress-marker", b"")
    async with contextlib.aclosing(client.watch(b"watch/quiet/", start_revision=0)) as watch:
        async with asyncio.timeout(10):
            item = await anext(watch)
    assert isinstance(item, WatchProgress) and item.revision >= now


async def test_closing_a_watch_ends_it_inside_etcd(client: EtcdClient) -> None:
    async def watchers() -> int:
        async with httpx.AsyncClient(trust_env=False) as http:
            text = (await http.get(f"http://{client.endpoint}/metrics")).text
        line = next(x for x in text.splitlines() if x.startswith("etcd_debugging_mvcc_watcher_"))
        return int(float(line.split()[1]))

    before = await watchers()
    revision = await client.put(b"watch/closed/a", b"1")
    watch = client.watch(b"watch/closed/", start_revision=revision)
    await next_events(watch, 1)
    assert await watchers() == before + 1
    await watch.aclose()

    async def released() -> bool:
        return await watchers() == before

    await wait_for(released, 10)


async def test_watch_from_a_compacted_revision_raises_compacted(client: EtcdClient) -> None:
    old = await client.put(b"compact/k", b"1")
    now = await client.put(b"compact/k", b"2")
    await client.compact(now)
    with pytest.raises(Compacted) as raised:
        async for _ in client.watch(b"compact/", start_revision=old):
            pass
    assert raised.value.revision == now
    with pytest.raises(EtcdError) as refused:
        await client.range_prefix(b"compact/", revision=old)
    assert refused.value.code == 11 and not isinstance(refused.value, EtcdUnavailable)


async def test_member_list_and_status_name_every_member(
    client: EtcdClient,
    etcd_cluster: EtcdCluster,
) -> None:
    members = await client.member_list()
    urls = {url for m in members for url in m.client_urls}
    assert urls == {f"http://{e}" for e in etcd_cluster.endpoints}
    statuses = [await client.status(e) for e in etcd_cluster.endpoints]
    assert {s.member_id for s in statuses} == {m.id for m in members}
    assert len({s.leader for s in statuses}) == 1 and statuses[0].leader in {m.id for m in members}
    assert all(s.raft_term >= 1 for s in statuses)


async def test_all_endpoints_dead_raise_unavailable_in_one_line() -> None:
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(2)]
    async with EtcdClient(endpoints, timeout=0.5) as client:
        with pytest.raises(EtcdUnavailable) as raised:
            await client.put(b"k", b"v")
    message = str(raised.value)
    assert "\n" not in message and all(e in message for e in endpoints), message


async def test_a_silent_watch_stream_raises_unavailable_after_its_idle_timeout() -> None:
    served = asyncio.Event()

    async def created_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")
        line = b'{"result":{"header":{"revision":"1"},"created":true}}\n'
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
        await reader.read()  # until the client gives up and closes
        writer.close()
        await writer.wait_closed()
        served.set()

    server = await asyncio.start_server(created_then_silent, "127.0.0.1", 0)
    async with server, EtcdClient([f"127.0.0.1:{server.sockets[0].getsockname()[1]}"]) as client:
        with pytest.raises(EtcdUnavailable, match="broke"):
            async with asyncio.timeout(10):
                await anext(client.watch(b"", start_revision=0, idle_timeout=0.3))
        await asyncio.wait_for(served.wait(), 5)


async def test_a_reply_past_the_size_cap_is_refused() -> None:
    lines = JsonLines(httpx.Response(200, content=b'{"kvs": "' + b"x" * 4096), cap=1024)
    with pytest.raises(EtcdError, match="passed 1024 bytes"):
        await lines.next()


async def test_killing_the_member_in_use_breaks_its_watch_and_calls_move_on(
    tmp_path: Path,
) -> None:
    async with EtcdCluster(tmp_path) as cluster:
        # The client starts on a follower, so that the survivors have a leader throughout.
        leader = await cluster.leader()
        used = (leader + 1) % cluster.size
        order = cluster.endpoints[used:] + cluster.endpoints[:used]
        async with EtcdClient(order, timeout=5.0) as client:
            revision = await client.put(b"failover/k", b"1")
            assert client.endpoint == cluster.endpoints[used]
            watch = client.watch(b"failover/", start_revision=revision)
            await next_events(watch, 1)
            await cluster.stop(used, signal.SIGKILL)
            with pytest.raises(EtcdUnavailable):
                await next_events(watch, 1)
            kv = await client.get(b"failover/k")
            assert kv is not None and kv.value == b"1"
            assert client.endpoint != cluster.endpoints[used]


async def test_killing_the_leader_elects_another_and_writes_resume(tmp_path: Path) -> None:
    async with EtcdCluster(tmp_path) as cluster:
        async with EtcdClient(cluster.endpoints, timeout=2.0) as client:
            old = await cluster.leader()
            await cluster.stop(old, signal.SIGKILL)

            async def written() -> bool:
                try:
                    await client.put(b"election/k", b"after")
                except EtcdUnavailable:
                    return False
                return True

            await wait_for(written, 15)
            assert await cluster.leader() != old
            # Back on its data dir, the old leader catches up on what it missed.
            await cluster.start(old)
            async with EtcdClient([cluster.endpoints[old]], timeout=5.0) as alone:
                kv = await alone.get(b"election/k")
            assert kv is not None and kv.value == b"after"
            await cluster.stop(old, signal.SIGTERM)
            assert await cluster.leader() != old


async def keepalive_streams(endpoint: str) -> float:
    """LeaseKeepAlive streams the member has opened (its own gRPC server metrics)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{endpoint}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grpc_server_started_total{") and 'grpc_method="LeaseKeepAlive"' in line
    )


async def test_concurrent_renewals_share_one_stream_and_each_gets_its_own_answer(
    etcd_cluster: EtcdCluster,
) -> None:
    endpoint = etcd_cluster.endpoints[0]
    async with EtcdClient([endpoint], timeout=5.0) as client:
        leases = [await client.grant(30) for _ in range(20)]
        await client.revoke(leases[-1].id)
        before = await keepalive_streams(endpoint)
        # Each lease renewed 10 times at once, interleaved: every answer is its lease's.
        results = await asyncio.gather(
            *(client.keepalive(lease.id) for _ in range(10) for lease in leases),
            return_exceptions=True,
        )
        opened = await keepalive_streams(endpoint) - before
    for i, result in enumerate(results):
        if i % len(leases) == len(leases) - 1:
            assert isinstance(result, LeaseNotFound), result
        else:
            assert result == 30, result
    assert opened == 1, f"{opened:g} LeaseKeepAlive streams for 200 renewals"


async def test_renewals_move_to_another_member_when_theirs_dies(tmp_path: Path) -> None:
    async with EtcdCluster(tmp_path) as cluster:
        used = (await cluster.leader() + 1) % cluster.size  # a follower: a leader stays
        order = cluster.endpoints[used:] + cluster.endpoints[:used]
        async with EtcdClient(order, timeout=3.0) as client:
            lease = await client.grant(30)
            assert await client.keepalive(lease.id) == 30
            await cluster.stop(used, signal.SIGKILL)
            assert await client.keepalive(lease.id) == 30
            assert await keepalive_streams(order[1]) >= 1


async def test_a_member_cut_off_from_its_leader_ends_its_watch(tmp_path: Path) -> None:
    """etcd's require-leader option: without it, a watch on a member that has lost its
    cluster stays open and silent, and the mirror behind it goes stale unnoticed."""
    async with EtcdCluster(tmp_path) as cluster:
        alone = (await cluster.leader() + 1) % cluster.size
        async with EtcdClient([cluster.endpoints[alone]], timeout=3.0) as client:
            revision = await client.put(b"cutoff/k", b"1")
            watch = client.watch(b"cutoff/", start_revision=revision)
            await next_events(watch, 1)
            for other in range(cluster.size):
                if other != alone:
                    await cluster.stop(other, signal.SIGKILL)
            # etcd notices within a few election timeouts (1 s each by default).
            with pytest.raises(EtcdUnavailable, match="no leader"):
                async with asyncio.timeout(20):
                    await next_events(watch, 1)
            await watch.aclose()
