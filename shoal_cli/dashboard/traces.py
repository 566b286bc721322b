"""The traces the dashboard was sent, kept in bounds, and what the page shows of them.

A trace's spans come from every process it went through, each exporting on its own
schedule (a sidecar each second, a worker when 512 spans wait or after 5 s), so a trace
is put together as its parts arrive, and may be shown before they all have: its root is
then the span whose parent has not come (yet).

Bounded: ``MAX_TRACES`` traces, the first heard of making room for a new one;
``MAX_SPANS`` spans each, the rest counted as dropped; strings as the receiver cut them
(``MAX_TEXT``). A snapshot holds the newest ``MAX_SHOWN`` traces and at most
``MAX_SHOWN_SPANS`` spans in all, so a page's event stream stays small.

Under load, the newest 100 traces are the last few milliseconds' calls, and the parts
the other processes send a second later would come for traces already gone: every
trace shown would be a piece. So new traces are taken at about ``ADMIT_PER_SECOND``,
chosen by trace id as OpenTelemetry's ``TraceIdRatioBased`` chooses (so each process's
spans of a trace are chosen alike), and a trace once taken keeps all its spans. The
share taken moves with the load, so a span is judged by the least share in force since
its trace started: the parts of a call that come late are judged as its first were.

Pure: no grpc; the receiver (``otlp``) turns exports into ``Span`` records.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMIT_PER_SECOND",
    "ATTRIBUTES",
    "Attribute",
    "MAX_SHOWN",
    "MAX_SHOWN_SPANS",
    "MAX_SPANS",
    "MAX_TEXT",
    "MAX_TRACES",
    "Span",
    "TraceStore",
    "tree_order",
]

MAX_TRACES = 100
MAX_SPANS = 64
MAX_SHOWN = 20
# 20 traces of a call's five spans fit many times over; 20 of 64 would not.
MAX_SHOWN_SPANS = 400
MAX_TEXT = 200
# The span attributes the page shows; the others say nothing an operator looks for here.
ATTRIBUTES = ("rpc.grpc.status_code", "shoal.upstream", "shoal.retries", "process.pid")
ADMIT_PER_SECOND = 5.0
# The share of new traces taken is set anew each window (or once the window has taken
# twice its due, so a burst is met at once), and only when the rate is off by 2x.
ADJUST_EVERY = 5.0
MIN_SHARE = 1e-6
# Changes of the share remembered: a late span is judged by those since its trace began.
SHARES_KEPT = 64
KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUSES = {1: "ok", 2: "error"}
_STATUS_ERROR = 2

Attribute = str | int | float | bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """One received span: ids in lower-case hex (``parent_id`` "" for the first span of a
    trace), ``kind`` and ``status`` as OTLP numbers them, times in ns since the epoch,
    ``service`` the exporting process's ``service.name``, ``attributes`` those of
    ``ATTRIBUTES`` it had."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    status: int = 0
    attributes: Mapping[str, Attribute] = field(default_factory=dict)


@dataclass
class _Trace:
    spans: dict[str, Span] = field(default_factory=dict)
    start_ns: int = 0
    dropped: int = 0


def _by_start(span: Span) -> tuple[int, str]:
    return span.start_ns, span.span_id


def tree_order(spans: Iterable[Span]) -> list[tuple[int, Span]]:
    """``spans`` (one trace's) depth-first with their depth, children by start. Roots (a
    parent not among them) come first the trace's own (no parent), then by start; spans
    caught in a parent cycle, which no root reaches, start trees of their own."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[Span]] = {}
    roots = []
    for span in by_id.values():
        if span.parent_id in by_id and span.parent_id != span.span_id:
            children.setdefault(span.parent_id, []).append(span)
        else:
            roots.append(span)
    roots.sort(key=lambda s: (s.parent_id != "", *_by_start(s)))
    order: list[tuple[int, Span]] = []
    seen: set[str] = set()
    for top in [*roots, *sorted(by_id.values(), key=_by_start)]:
        stack = [(0, top)]
        while stack:
            depth, span = stack.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            order.append((depth, span))
            below = sorted(children.get(span.span_id, ()), key=_by_start, reverse=True)
            stack.extend((depth + 1, child) for child in below)
    return order


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


class TraceStore:
    """The traces received lately, by trace id; ``add`` spans, read ``as_json``.

    ``admit_per_second`` None takes every new trace; ``clock`` is monotonic seconds,
    ``wall`` the epoch's (which spans' times count from).
    """

    def __init__(
        self,
        *,
        max_traces: int = MAX_TRACES,
        max_spans: int = MAX_SPANS,
        admit_per_second: float | None = ADMIT_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_traces < 1 or max_spans < 1:
            raise ValueError("a trace store holds at least one trace of one span")
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._max_traces = max_traces
        self._max_spans = max_spans
        self._target = admit_per_second
        self._clock = clock
        self._wall = wall
        self.share = 1.0  # of new traces taken
        self._shares: deque[tuple[int, float]] = deque([(0, 1.0)], maxlen=SHARES_KEPT)
        self._since = clock()
        self._taken = 0
        self.received = 0
        self.dropped = 0  # spans past a trace's bound
        self.passed_over = 0  # spans of traces not taken
        self.evicted = 0  # traces

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, spans: Iterable[Span]) -> None:
        for span in spans:
            self.received += 1
            trace = self._traces.get(span.trace_id)
            if trace is None:
                if not self._take(span.trace_id, span.start_ns):
                    self.passed_over += 1
                    continue
                if len(self._traces) >= self._max_traces:
                    self._traces.popitem(last=False)
                    self.evicted += 1
                trace = self._traces[span.trace_id] = _Trace(start_ns=span.start_ns)
            if span.span_id not in trace.spans and len(trace.spans) >= self._max_spans:
                trace.dropped += 1
                self.dropped += 1
                continue
            trace.spans[span.span_id] = span
            trace.start_ns = min(trace.start_ns, span.start_ns)

    def _take(self, trace_id: str, start_ns: int) -> bool:
        """Whether to keep a trace not kept yet, one of whose spans started at
        ``start_ns`` (see the module's docstring)."""
        if self._target is None:
            return True
        now = self._clock()
        elapsed = now - self._since
        if elapsed >= ADJUST_EVERY or self._taken > 2 * self._target * ADJUST_EVERY:
            self._adjust(self._taken / max(elapsed, 1e-3), self._target)
            self._since, self._taken = now, 0
        share = self._least_since(start_ns)
        # The low 64 bits of the id, as TraceIdRatioBased compares them.
        if share < 1.0 and int(trace_id[-16:], 16) >= share * 2**64:
            return False
        self._taken += 1
        return True

    def _adjust(self, rate: float, target: float) -> None:
        # Within 2x of the target the share stays: one that moved each window would take
        # a trace for one process's spans and pass it over for another's a moment later.
        if rate > 2 * target or (rate < target / 2 and self.share < 1.0):
            wanted = self.share * target / max(rate, target / 16)
            self.share = min(1.0, max(MIN_SHARE, wanted))
            self._shares.append((round(self._wall() * 1e9), self.share))

    def _least_since(self, start_ns: int) -> float:
        # A share that rose since would take a trace whose earlier parts were passed
        # over; one that fell passes over only traces whose earlier parts were too.
        least = 1.0
        for since, share in reversed(self._shares):
            least = min(least, share)
            if since <= start_ns:
                break
        return least

    def as_json(self, shown: int = MAX_SHOWN) -> dict[str, Any]:
        """The counts, and the newest ``shown`` traces (by start), newest first."""
        newest = sorted(self._traces.items(), key=lambda item: item[1].start_ns, reverse=True)
        budget, recent = MAX_SHOWN_SPANS, []
        for trace_id, trace in newest[:shown]:
            recent.append(_summary(trace_id, trace, budget))
            budget -= len(recent[-1]["spans"])
        return {
            "kept": len(self._traces),
            "received": self.received,
            "dropped": self.dropped,
            "passed_over": self.passed_over,
            "evicted": self.evicted,
            "share": round(self.share, 6),
            "recent": recent,
        }


def _summary(trace_id: str, trace: _Trace, budget: int) -> dict[str, Any]:
    order = tree_order(trace.spans.values())
    root = order[0][1]
    start = min(s.start_ns for s in trace.spans.values())
    end = max(s.end_ns for s in trace.spans.values())
    # One root: the tree hangs together and the root's time is the call's. More: pieces
    # whose joining spans have not come, so the whole stretch they cover.
    connected = sum(1 for depth, _ in order if depth == 0) == 1
    duration = root.end_ns - root.start_ns if connected else end - start
    shown = order[: max(0, budget)]
    return {
        "trace_id": trace_id,
        "root": root.name,
        "service": root.service,
        "start": round(start / 1e9, 6),
        "duration_ms": _ms(max(0, duration)),
        "span_count": len(order),
        "dropped": trace.dropped,
        "error": any(s.status == _STATUS_ERROR for s in trace.spans.values()),
        "services": list(dict.fromkeys(s.service for _, s in order)),
        "spans": [_span(depth, s, start) for depth, s in shown],
        "spans_cut": len(order) - len(shown),
    }


def _span(depth: int, span: Span, trace_start: int) -> dict[str, Any]:
    return {
        "id": span.span_id,
        "depth": depth,
        "service": span.service,
        "name": span.name,
        "kind": KINDS.get(span.kind, "unspecified"),
        "offset_ms": _ms(span.start_ns - trace_start),
        "duration_ms": _ms(max(0, span.end_ns - span.start_ns)),
        "status": STATUSES.get(span.status, "unset"),
        "attributes": dict(span.attributes),
    }
