"""The response cache: LRU with TTL, bounded by entries and bytes, with single-flight.

An ``OrderedDict`` gives O(1) lookup, recency update (``move_to_end``) and
eviction of the least recently used entry (``popitem(last=False)``). Expired
entries are dropped when they are looked up, and evicted like any other when
space is needed. Identical misses that arrive while the first is still running
wait for its result instead of running again; failures are never cached.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

__all__ = ["CacheCounters", "Lookup", "ResponseCache"]

V = TypeVar("V")
Lookup = Literal["hit", "miss", "coalesced"]


@dataclass(slots=True)
class CacheCounters:
    """Counters since start."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    evictions: int = 0
    expirations: int = 0


class _LeaderGone(Exception):
    """The caller running a miss went away; a waiting caller runs it itself."""


class ResponseCache(Generic[V]):
    """Values with a byte size, kept for ``ttl`` seconds within entry and byte limits."""

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.counters = CacheCounters()
        self._clock = clock
        # key -> (value, size in bytes including the key, expiry time)
        self._entries: collections.OrderedDict[bytes, tuple[V, int, float]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._flights: dict[bytes, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= self._clock():
            self._remove(key)
            self.counters.expirations += 1
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: V, size: int) -> None:
        """Store ``value``; one larger than the whole cache is not stored."""
        total = size + len(key)
        if total > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (value, total, self._clock() + self.ttl)
        self._bytes += total
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            old_key, (_, old_size, _) = self._entries.popitem(last=False)
            self._bytes -= old_size
            self.counters.evictions += 1

    async def get_or_run(
        self, key: bytes, run: Callable[[], Awaitable[tuple[V, int]]]
    ) -> tuple[V, Lookup]:
        """The cached value, or ``run()``'s result, computed once however many ask at once."""
        while True:
            value = self.get(key)
            if value is not None:
                self.counters.hits += 1
                return value, "hit"
            flight = self._flights.get(key)
            if flight is None:
                break
            self.counters.coalesced += 1
            try:
                return await asyncio.shield(flight), "coalesced"
            except _LeaderGone:
                self.counters.coalesced -= 1
        self.counters.misses += 1
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            value, size = await run()
        except BaseException as exc:
            del self._flights[key]
            gone = isinstance(exc, asyncio.CancelledError)
            flight.set_exception(_LeaderGone() if gone else exc)
            flight.exception()  # retrieved: nobody may be waiting
            raise
        del self._flights[key]
        self.put(key, value, size)
        flight.set_result(value)
        return value, "miss"

    def _remove(self, key: bytes) -> None:
        _, size, _ = self._entries.pop(key)
        self._bytes -= size
