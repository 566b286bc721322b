"""Self-preservation: when many leases lapse at once, suspect ourselves, not them.

If more than a share of all instances (distinct instances, not lapses) lapse
inside one window, the likelier story is that this registry was cut off from
them, so it stops evicting. Unlike
registries that can stay stuck in this mode, it always leaves it: as soon as
the overdue share drops back to the threshold (heartbeats returned), or after a
bounded time, after which evictions resume and the mode cannot re-trigger on
that same backlog for one window.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SelfPreservation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Settings:
    share: float
    window: float
    max_duration: float
    min_instances: int


class SelfPreservation:
    """Decides, once per sweep, whether lapsed leases may be evicted."""

    def __init__(
        self, *, share: float, window: float, max_duration: float, min_instances: int
    ) -> None:
        self._cfg = _Settings(share, window, max_duration, min_instances)
        # instance id -> when it last lapsed, oldest first; at most one entry per instance.
        self._recent: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._since: float | None = None
        self._cooldown_until = float("-inf")
        self.reason = ""
        self.entered_total = 0

    @property
    def active(self) -> bool:
        return self._since is not None

    def seconds_active(self, now: float) -> float:
        return 0.0 if self._since is None else now - self._since

    def carry_on(self, active_for: float, reason: str, now: float) -> None:
        """Take up a state entered elsewhere ``active_for`` seconds ago (a new leader
        carrying on its predecessor's decision): its time bound still counts from then."""
        self._since = now - active_for
        self.reason = reason

    def allow_evictions(self, now: float, overdue: Sequence[str], total: int) -> bool:
        """Called each sweep with the overdue instances' ids; False means hold every eviction.

        Lapses are counted per instance: one flapping instance that lapses again and again
        is one instance in trouble, not a sign that we are cut off from the fleet.
        """
        cfg = self._cfg
        recent = self._recent
        while recent and next(iter(recent.values())) <= now - cfg.window:
            recent.popitem(last=False)
        if self._since is not None:
            if now - self._since >= cfg.max_duration:
                self._leave(now, f"time bound of {cfg.max_duration:g}s reached")
                # The backlog now evicted must not count towards re-entering at once.
                self._cooldown_until = now + cfg.window
                return True
            if len(overdue) <= cfg.share * total:
                self._leave(now, "heartbeats returned")
                self._remember(now, overdue)
                return True
            return False
        lapsed = len(recent.keys() | set(overdue))
        if (
            overdue
            and total >= cfg.min_instances
            and lapsed > cfg.share * total
            and now >= self._cooldown_until
        ):
            self._enter(now, lapsed, total)
            return False
        if now >= self._cooldown_until:
            self._remember(now, overdue)
        return True

    def _remember(self, now: float, lapsed: Sequence[str]) -> None:
        for instance_id in lapsed:
            # Moved to the end so the dict stays ordered by the time of each last lapse.
            self._recent.pop(instance_id, None)
            self._recent[instance_id] = now

    def _enter(self, now: float, lapsed: int, total: int) -> None:
        self._since = now
        self.entered_total += 1
        self.reason = (
            f"{lapsed} of {total} instances lapsed within {self._cfg.window:g}s "
            f"(more than {self._cfg.share:.0%}); holding evictions"
        )
        self._recent.clear()
        logger.warning("entering self-preservation: %s", self.reason)

    def _leave(self, now: float, why: str) -> None:
        logger.warning("leaving self-preservation after %.1fs: %s", now - (self._since or now), why)
        self._since = None
        self.reason = ""
