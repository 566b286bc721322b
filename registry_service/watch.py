"""Fan-out of registry changes to watchers.

Each change is rendered once (by the ``render`` function the servicer gives,
typically to a wire message) and then appended to the queue of every watcher of
that service: many watchers cost one render and N appends, never N polls. A
watcher whose queue would pass ``limit`` events or ``limit_bytes`` (the rendered
sizes, as ``size`` measures them) is marked overflowed and resynchronised with a
fresh snapshot instead of holding memory without bound. The stream takes events
off the queue one revision at a time, so what it has not sent yet stays counted.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

from registry_service.backend import RegistryView
from registry_service.model import Event

__all__ = ["Subscription", "WatchHub"]

T = TypeVar("T")

ALL_SERVICES = ""


class Subscription(Generic[T]):
    """One watcher's queue of rendered events, each with its revision."""

    def __init__(self, service: str, limit: int, limit_bytes: int) -> None:
        self.service = service
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._items: collections.deque[tuple[int, T, int]] = collections.deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push(self, revision: int, item: T, size: int) -> None:
        if len(self._items) >= self._limit or self._bytes + size > self._limit_bytes:
            self.clear()
            self.overflowed = True
        else:
            self._items.append((revision, item, size))
            self._bytes += size
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def wait(self, timeout: float) -> bool:
        """Wait until there is something to do; False when ``timeout`` passed idle."""
        if self._items or self.overflowed or self.closed:
            return True
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def pop(self) -> tuple[int, list[T]] | None:
        """The oldest queued revision and its events (one, or several that one etcd
        transaction made), or None when the queue is empty."""
        if not self._items:
            return None
        revision = self._items[0][0]
        items = []
        while self._items and self._items[0][0] == revision:
            _, item, size = self._items.popleft()
            self._bytes -= size
            items.append(item)
        return revision, items

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class WatchHub(Generic[T]):
    """Routes each store event to the watchers of its service and of all services."""

    def __init__(
        self,
        store: RegistryView,
        render: Callable[[Event], T],
        size: Callable[[T], int],
        *,
        limit: int,
        limit_bytes: int,
    ) -> None:
        self._render = render
        self._size = size
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._subs: dict[str, set[Subscription[T]]] = collections.defaultdict(set)
        self.closed = False
        store.subscribe(self._on_event)

    @property
    def watchers(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    def open(self, service: str) -> Subscription[T]:
        sub: Subscription[T] = Subscription(service, self._limit, self._limit_bytes)
        if self.closed:
            sub.close()
        else:
            self._subs[service].add(sub)
        return sub

    def release(self, sub: Subscription[T]) -> None:
        subs = self._subs.get(sub.service)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.service]

    def close_all(self) -> None:
        """End every watch stream: used on shutdown so streams finish cleanly."""
        self.closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.close()

    def _on_event(self, event: Event) -> None:
        targets = self._subs.get(event.instance.spec.service)
        everyone = self._subs.get(ALL_SERVICES)
        if not targets and not everyone:
            return
        item = self._render(event)
        size = self._size(item)
        for subs in (targets, everyone):
            if subs:
                for sub in subs:
                    sub.push(event.revision, item, size)
