"""The change history watchers resume from, bounded by event count and by bytes.

Events are kept in revision order; revisions are consecutive, so the event of a
revision is found by arithmetic, and a replay reads them one at a time: a slow
resuming watcher pins no event the history has let go.

What the byte bound counts (``bytes``): per event, the ``Event``, its ``Instance``
and ``LoadReport`` objects and the list slot; per distinct ``InstanceSpec``, its
``retained_bytes()`` and its bookkeeping entry once, however many events share it
(every event of one lease does). A spec still registered is counted although the
instance table holds it too: the history alone keeps it alive once the instance
is gone. Measured RSS stays within a few percent of this for large specs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from registry_service.model import Event, InstanceSpec

__all__ = ["History", "Replay"]

_SLOT = 8  # one list slot: a pointer
# A spec's entry in History._specs: the dict slot, the [count, size] list, its ints.
_SPEC_ENTRY = 3 * 8 + sys.getsizeof([0, 0]) + 2 * sys.getsizeof(1 << 40)


def _event_bytes(event: Event) -> int:
    inst = event.instance
    return sys.getsizeof(event) + sys.getsizeof(inst) + sys.getsizeof(inst.load) + _SLOT


class History:
    """The newest events, at most ``max_events`` of them holding at most ``max_bytes``."""

    def __init__(self, *, max_events: int, max_bytes: int) -> None:
        self._max_events = max_events
        self._max_bytes = max_bytes
        # A list with a moving head instead of a deque: O(1) access by position.
        self._events: list[Event | None] = []
        self._head = 0
        # id(spec) -> [events holding it, its retained bytes]; the events keep it alive.
        self._specs: dict[int, list[int]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._events) - self._head

    @property
    def first_revision(self) -> int | None:
        """The oldest revision still held, or None when the history is empty."""
        first = self._event_at(self._head)
        return None if first is None else first.revision

    def append(self, event: Event) -> None:
        spec = event.instance.spec
        held = self._specs.get(id(spec))
        if held is None:
            held = self._specs[id(spec)] = [0, spec.retained_bytes() + _SPEC_ENTRY]
            self.bytes += held[1]
        held[0] += 1
        self.bytes += _event_bytes(event)
        self._events.append(event)
        while len(self) > self._max_events or (self.bytes > self._max_bytes and len(self)):
            self._evict()

    def get(self, revision: int) -> Event | None:
        """The event of ``revision``, or None when it is not (or no longer) held."""
        first = self.first_revision
        if first is None or revision < first:
            return None
        return self._event_at(self._head + revision - first)

    def replay(self, *, after: int, until: int, service: str) -> Replay | None:
        """Events ``after`` < revision <= ``until`` (of ``service`` if given), read lazily;
        None when the history no longer reaches back to ``after + 1``."""
        if after < until:
            first = self.first_revision
            if first is None or after + 1 < first:
                return None
        return Replay(self, after, until, service)

    def _event_at(self, index: int) -> Event | None:
        return self._events[index] if index < len(self._events) else None

    def _evict(self) -> None:
        event = self._events[self._head]
        assert event is not None
        self._events[self._head] = None
        self._head += 1
        self.bytes -= _event_bytes(event)
        spec: InstanceSpec = event.instance.spec
        held = self._specs[id(spec)]
        held[0] -= 1
        if not held[0]:
            del self._specs[id(spec)]
            self.bytes -= held[1]
        # Compact once the dead prefix is as long as the rest: amortised O(1) per event.
        if self._head * 2 >= len(self._events):
            del self._events[: self._head]
            self._head = 0


class Replay:
    """An iterable of past events; ``lost`` turns true if the history moved past it first."""

    def __init__(self, history: History, after: int, until: int, service: str) -> None:
        self._history = history
        self._next = after + 1
        self._until = until
        self._service = service
        self.lost = False

    def __iter__(self) -> Iterator[Event]:
        while self._next <= self._until:
            event = self._history.get(self._next)
            if event is None:
                self.lost = True
                return
            self._next += 1
            if not self._service or event.instance.spec.service == self._service:
                yield event
