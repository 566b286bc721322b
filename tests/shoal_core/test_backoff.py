"""The one backoff every retry loop uses: doubling, capped, with equal jitter."""

from __future__ import annotations

import random

import pytest

from shoal_core.backoff import Attempts, Backoff


def test_pauses_double_up_to_the_cap_and_keep_half_of_each_ceiling():
    backoff = Backoff(initial=0.1, maximum=1.0)
    assert [backoff.ceiling(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    rng = random.Random(3)
    for retry in range(12):
        ceiling = backoff.ceiling(retry)
        pauses = [backoff.delay(retry, rng) for _ in range(200)]
        # Never under half (no hot loop), never over the ceiling.
        assert all(ceiling / 2 <= p <= ceiling for p in pauses)
        # Jittered: clients that failed together come back apart.
        assert len(set(pauses)) == 200
        assert max(pauses) - min(pauses) > ceiling / 4
    # A huge retry count cannot overflow: it is just the cap.
    assert backoff.ceiling(10_000) == 1.0


def test_attempts_back_off_while_failing_and_start_over_after_a_success():
    attempts = Attempts(Backoff(initial=0.05, maximum=0.4), random.Random(1))
    pauses = [attempts.failed() for _ in range(6)]
    ceilings = [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert all(c / 2 <= p <= c for p, c in zip(pauses, ceilings, strict=True))
    assert attempts.failures == 6
    attempts.succeeded()
    assert attempts.failures == 0 and attempts.failed() <= 0.05


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_backoff_that_cannot_work_is_refused(initial, maximum):
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        Backoff(initial=initial, maximum=maximum)
