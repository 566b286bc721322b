"""Outlier detection: take an endpoint out of rotation after consecutive failures (no gRPC).

An endpoint is ejected after ``consecutive_failures`` failures in a row, for
``base_ejection`` seconds times the number of times it has been ejected (capped
at ``max_ejection``); every ``base_ejection`` seconds spent back in rotation
forgives one past ejection. Never more than ``max_ejected_percent`` of the set
is ejected at once, so a wide outage does not empty the set by itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy_sidecar.endpoints import Endpoint

__all__ = ["OutlierDetector"]


@dataclass(slots=True)
class _Record:
    streak: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    returned_at: float = 0.0


class OutlierDetector:
    """Ejection state for the endpoints of one service."""

    def __init__(
        self,
        *,
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejected_percent: float = 50.0,
    ) -> None:
        self._threshold = consecutive_failures
        self._base = base_ejection
        self._max = max_ejection
        self._share = max_ejected_percent / 100.0
        self._records: dict[Endpoint, _Record] = {}
        self._ejected: set[Endpoint] = set()
        # The earliest time an ejection ends; compared on every pick, so kept as one float.
        self.next_return = math.inf
        # Bumped whenever the ejected set changes.
        self.version = 0

    def is_ejected(self, endpoint: Endpoint) -> bool:
        return endpoint in self._ejected

    @property
    def ejected_count(self) -> int:
        return len(self._ejected)

    def ejected_until(self, endpoint: Endpoint) -> float | None:
        # Read from the event loop while the data plane thread may forget the endpoint:
        # single lookups only, never a check then an index.
        record = self._records.get(endpoint)
        if record is None or endpoint not in self._ejected:
            return None
        return record.ejected_until

    def ejections(self, endpoint: Endpoint) -> int:
        record = self._records.get(endpoint)
        return 0 if record is None else record.ejections

    def success(self, endpoint: Endpoint) -> None:
        record = self._records.get(endpoint)
        if record is not None:
            record.streak = 0

    def failure(self, endpoint: Endpoint, now: float, population: int) -> bool:
        """Count a failure; return True when it ejected the endpoint."""
        record = self._records.get(endpoint)
        if record is None:
            record = self._records[endpoint] = _Record()
        record.streak += 1
        if record.streak < self._threshold or endpoint in self._ejected:
            return False
        if len(self._ejected) + 1 > self._share * population:
            return False
        if record.ejections and record.returned_at:
            forgiven = int((now - record.returned_at) / self._base)
            record.ejections = max(0, record.ejections - forgiven)
        record.ejections += 1
        record.ejected_until = now + min(self._max, self._base * record.ejections)
        record.streak = 0
        self._ejected.add(endpoint)
        self.next_return = min(self.next_return, record.ejected_until)
        self.version += 1
        return True

    def release_due(self, now: float) -> list[Endpoint]:
        """Return endpoints whose ejection has ended to rotation; list them."""
        if now < self.next_return:
            return []
        back = [e for e in self._ejected if self._records[e].ejected_until <= now]
        for endpoint in back:
            self._ejected.discard(endpoint)
            record = self._records[endpoint]
            record.returned_at = now
            record.streak = 0
        self.next_return = min(
            (self._records[e].ejected_until for e in self._ejected), default=math.inf
        )
        if back:
            self.version += 1
        return back

    def forget(self, keep: set[Endpoint]) -> None:
        """Drop state of endpoints that left the set."""
        for endpoint in [e for e in self._records if e not in keep]:
            del self._records[endpoint]
            if endpoint in self._ejected:
                self._ejected.discard(endpoint)
                self.version += 1
        self.next_return = min(
            (self._records[e].ejected_until for e in self._ejected), default=math.inf
        )
