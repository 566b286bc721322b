"""Fan-out of registry changes to watchers.

Each change is rendered once (by the ``render`` function the servicer gives,
typically to a wire message) and then appended to the queue of every watcher of
that service: many watchers cost one render and N appends, never N polls. A
watcher that falls more than ``limit`` events behind is marked overflowed and
resynchronised with a fresh snapshot instead of holding memory without bound.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

from registry_service.model import Event
from registry_service.store import RegistryStore

__all__ = ["Subscription", "WatchHub"]

T = TypeVar("T")

ALL_SERVICES = ""


class Subscription(Generic[T]):
    """One watcher's queue of rendered events, each with its revision."""

    def __init__(self, service: str, limit: int) -> None:
        self.service = service
        self._limit = limit
        self._items: collections.deque[tuple[int, T]] = collections.deque()
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push(self, revision: int, item: T) -> None:
        if len(self._items) >= self._limit:
            self._items.clear()
            self.overflowed = True
        else:
            self._items.append((revision, item))
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

    def drain(self) -> list[tuple[int, T]]:
        items = list(self._items)
        self._items.clear()
        return items


class WatchHub(Generic[T]):
    """Routes each store event to the watchers of its service and of all services."""

    def __init__(self, store: RegistryStore, render: Callable[[Event], T], limit: int) -> None:
        self._render = render
        self._limit = limit
        self._subs: dict[str, set[Subscription[T]]] = collections.defaultdict(set)
        self.closed = False
        store.subscribe(self._on_event)

    @property
    def watchers(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    def open(self, service: str) -> Subscription[T]:
        sub: Subscription[T] = Subscription(service, self._limit)
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
        for subs in (targets, everyone):
            if subs:
                for sub in subs:
                    sub.push(event.revision, item)
