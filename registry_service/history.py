"""The change history watchers resume from, bounded by event count and by bytes.

Events are kept in revision order. Revisions may have gaps: the memory store's are
consecutive, but an etcd mirror's are etcd's, which other keys use too. And one
revision may hold several events: an etcd transaction that wrote several records
(batched heartbeat writes) gives each the same revision; such a group is one change to
watchers, never split. So the events after a revision are found by bisection, and the
history knows the revision it is complete from (``floor``: every event after it is
held), which moves up as old events are let go. A replay reads one revision's events
at a time: a slow resuming watcher pins no other event the history has let go.

What the byte bound counts (``bytes``): per event, the ``Event``, its ``Instance``
and ``LoadReport`` objects and the list slot; per distinct ``InstanceSpec``, its
``retained_bytes()`` and its bookkeeping entry once, however many events share it
(every event of one lease does). A spec still registered is counted although the
instance table holds it too: the history alone keeps it alive once the instance
is gone. Measured RSS stays within a few percent of this for large specs.
"""

from __future__ import annotations

import bisect
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


def _revision(event: Event | None) -> int:
    # Only slots from the head on are searched, and none of those is empty.
    assert event is not None
    return event.revision


class History:
    """The newest events, at most ``max_events`` of them holding at most ``max_bytes``.

    ``start``: the revision the history is complete from (it holds every event after
    it); by default, the revision just before the first event appended.
    """

    def __init__(self, *, max_events: int, max_bytes: int, start: int | None = None) -> None:
        self._max_events = max_events
        self._max_bytes = max_bytes
        # A list with a moving head instead of a deque: O(1) access by position.
        self._events: list[Event | None] = []
        self._head = 0
        self._floor = start
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

    @property
    def floor(self) -> int | None:
        """Every event after this revision is held; None before the first event."""
        return self._floor

    def append(self, event: Event) -> None:
        last = self._event_at(len(self._events) - 1) if len(self) else None
        bound = last.revision if last is not None else self._floor
        if bound is not None and (
            event.revision < bound or (event.revision == bound and last is None)
        ):
            raise ValueError(f"revision {event.revision} does not follow {bound}")
        if self._floor is None:
            self._floor = event.revision - 1
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
        """The (first) event of ``revision``, or None when there is none (or no longer)."""
        event = self.next_after(revision - 1)
        return event if event is not None and event.revision == revision else None

    def next_after(self, revision: int) -> Event | None:
        """The oldest event held after ``revision``, or None when there is none."""
        index = bisect.bisect_right(self._events, revision, lo=self._head, key=_revision)
        return self._event_at(index)

    def group_after(self, revision: int) -> list[Event]:
        """Every event of the oldest revision held after ``revision`` ([]: none)."""
        first = bisect.bisect_right(self._events, revision, lo=self._head, key=_revision)
        event = self._event_at(first)
        if event is None:
            return []
        end = bisect.bisect_right(self._events, event.revision, lo=first, key=_revision)
        return [e for e in self._events[first:end] if e is not None]

    def replay(self, *, after: int, until: int, service: str) -> Replay | None:
        """Events ``after`` < revision <= ``until`` (of ``service`` if given), read lazily;
        None when the history no longer reaches back to ``after``."""
        if after < until and (self._floor is None or after < self._floor):
            return None
        return Replay(self, after, until, service)

    def _event_at(self, index: int) -> Event | None:
        return self._events[index] if 0 <= index < len(self._events) else None

    def _evict(self) -> None:
        event = self._events[self._head]
        assert event is not None
        self._events[self._head] = None
        self._head += 1
        self._floor = event.revision
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
        self._last = after
        self._until = until
        self._service = service
        self.lost = False

    def __iter__(self) -> Iterator[Event]:
        for group in self.groups():
            yield from group

    def groups(self) -> Iterator[list[Event]]:
        """The events one revision at a time (of ``service``, if given): a revision's
        events come whole or, once the history let them go, not at all."""
        while self._last < self._until:
            floor = self._history.floor
            if floor is not None and floor > self._last:
                # Events after the last one read were let go before this reader got them.
                self.lost = True
                return
            group = self._history.group_after(self._last)
            if not group or group[0].revision > self._until:
                return
            self._last = group[0].revision
            if self._service:
                group = [e for e in group if e.instance.spec.service == self._service]
            if group:
                yield group
