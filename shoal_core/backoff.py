"""One backoff for every loop in Shoal that tries again: exponential, capped, jittered.

The pause before retry ``n`` (0-based) is drawn from ``[c/2, c]``, where
``c = min(maximum, initial * 2**n)``: "equal jitter". Half of it is fixed, so a loop
whose every try fails at once is never a hot loop; half is random, so the many
clients of one server that failed together do not all come back at the same
instant. The sidecar's data plane reconnects by the same rule
(``dataplane/src/pool.rs``), in Rust.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Attempts", "Backoff"]

# 2**30 times any initial pause is past every cap anyone sets.
_MAX_DOUBLINGS = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Pauses that double from ``initial`` up to ``maximum`` seconds, with equal jitter."""

    initial: float
    maximum: float

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"a backoff needs 0 < initial <= maximum, got {self.initial} and {self.maximum}"
            )

    def ceiling(self, retry: int) -> float:
        """The longest pause before retry ``retry`` (0-based)."""
        return min(self.maximum, self.initial * 2.0 ** min(max(retry, 0), _MAX_DOUBLINGS))

    def delay(self, retry: int, rng: random.Random) -> float:
        """The pause before retry ``retry``: in [ceiling / 2, ceiling]."""
        ceiling = self.ceiling(retry)
        return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass(slots=True)
class Attempts:
    """One loop's consecutive failures, and the pause before its next try."""

    backoff: Backoff
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def failed(self) -> float:
        """Count a failure; the pause before trying again."""
        pause = self.backoff.delay(self.failures, self.rng)
        self.failures = min(self.failures + 1, _MAX_DOUBLINGS)
        return pause

    def succeeded(self) -> None:
        """The loop got through: the next failure starts from the initial pause."""
        self.failures = 0
