"""The response cache: LRU order, TTL, byte bounds, single-flight; and through a server."""

from __future__ import annotations

import asyncio

import pytest

from protos import worker_pb2 as pb
from tests.worker_node.conftest import pool_stats, stats
from worker_node.cache import ResponseCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lru_evicts_the_least_recently_used_entry():
    cache: ResponseCache[str] = ResponseCache(ttl=60, max_entries=2, max_bytes=10_000)
    cache.put(b"a", "A", 1)
    cache.put(b"b", "B", 1)
    assert cache.get(b"a") == "A"  # a is now the most recent
    cache.put(b"c", "C", 1)
    assert (cache.get(b"a"), cache.get(b"b"), cache.get(b"c")) == ("A", None, "C")
    assert cache.counters.evictions == 1 and len(cache) == 2


def test_byte_bound_and_ttl():
    clock = Clock()
    cache: ResponseCache[str] = ResponseCache(ttl=5, max_entries=100, max_bytes=1024, clock=clock)
    cache.put(b"k1", "x", 500)
    cache.put(b"k2", "y", 500)
    assert cache.size_bytes == 1004
    cache.put(b"k3", "z", 500)  # over 1024 bytes: k1 goes
    assert cache.get(b"k1") is None and cache.size_bytes == 1004
    cache.put(b"huge", "w", 5000)  # larger than the whole cache: not stored
    assert cache.get(b"huge") is None and len(cache) == 2
    clock.now = 5.0
    assert cache.get(b"k2") is None
    assert cache.counters.expirations == 1 and cache.size_bytes == 502


async def test_identical_misses_run_once_and_failures_are_not_cached():
    cache: ResponseCache[str] = ResponseCache(ttl=60, max_entries=10, max_bytes=10_000)
    runs = 0

    async def slow() -> tuple[str, int]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.1)
        return "v", 1

    got = await asyncio.gather(*(cache.get_or_run(b"k", slow) for _ in range(5)))
    assert runs == 1
    assert sorted(lookup for _, lookup in got) == ["coalesced"] * 4 + ["miss"]
    assert await cache.get_or_run(b"k", slow) == ("v", "hit")

    async def boom() -> tuple[str, int]:
        raise ValueError("no")

    with pytest.raises(ValueError):
        await cache.get_or_run(b"e", boom)
    assert cache.get(b"e") is None


async def test_a_waiter_takes_over_when_the_first_caller_leaves():
    cache: ResponseCache[str] = ResponseCache(ttl=60, max_entries=10, max_bytes=10_000)

    async def slow() -> tuple[str, int]:
        await asyncio.sleep(0.2)
        return "v", 1

    leader = asyncio.ensure_future(cache.get_or_run(b"k", slow))
    await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(cache.get_or_run(b"k", slow))
    await asyncio.sleep(0.01)
    leader.cancel()
    assert await follower == ("v", "miss")


async def test_cached_calls_say_so_and_concurrent_misses_run_once(worker):
    _, stub = worker
    before = (await pool_stats(stub)).tasks_done
    calls = [stub.Call(pb.CallRequest(function="slow_upper", payload=b"q")) for _ in range(5)]
    replies = await asyncio.gather(*calls)
    assert {r.result for r in replies} == {b"Q"}
    lookups = sorted([dict(await c.trailing_metadata())["shoal-cache"] for c in calls])
    assert lookups == ["coalesced"] * 4 + ["miss"]
    assert (await pool_stats(stub)).tasks_done == before + 1
    again = stub.Call(pb.CallRequest(function="slow_upper", payload=b"q"))
    assert (await again).result == b"Q"
    assert dict(await again.trailing_metadata())["shoal-cache"] == "hit"
    cache = (await stats(stub)).cache
    assert (cache.hits, cache.misses, cache.coalesced, cache.entries) == (1, 1, 4, 1)
