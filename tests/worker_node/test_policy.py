"""The pool's scaling and restart decisions, with plain numbers and a fake clock."""

from __future__ import annotations

import random
import signal

import pytest

from worker_node.policy import (
    QUICK_DEATH_SECONDS,
    classify_exit,
    idle_to_retire,
    quick_deaths_after,
    restart_delay,
    scale_down_tick,
    should_rerun,
    should_restart,
    should_scale_up,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


CRASH, SIGTERM = 7, -signal.SIGTERM


@pytest.mark.parametrize(
    ("stop_reason", "returncode", "kind"),
    [
        ("retired", 0, "retired"),
        ("shutdown", -9, "retired"),
        ("timeout", -9, "failure"),
        ("limit", -9, "failure"),
        (None, None, "failure"),
        (None, CRASH, "failure"),
        (None, -signal.SIGKILL, "failure"),
        (None, 0, "clean"),
        (None, SIGTERM, "stopped"),
        (None, -signal.SIGINT, "stopped"),
    ],
)
def test_classify_exit_tells_retirement_failure_clean_and_stopped_apart(
    stop_reason, returncode, kind
):
    assert classify_exit(stop_reason, returncode) == kind


# The table in worker_node/policy.py: policy -> replaced after (failure, clean, stopped).
TABLE = {
    "never": (False, False, False),
    "on-failure": (True, False, False),
    "always": (True, True, True),
    "unless-stopped": (True, True, False),
}


@pytest.mark.parametrize("restart", sorted(TABLE))
def test_should_restart_follows_the_table_and_never_while_closing(restart):
    got = tuple(should_restart(restart, kind) for kind in ("failure", "clean", "stopped"))
    assert got == TABLE[restart]
    assert not should_restart(restart, "retired")
    assert not any(
        should_restart(restart, kind, closing=True) for kind in ("failure", "clean", "stopped")
    )


@pytest.mark.parametrize("restart", sorted(TABLE))
def test_should_rerun_follows_the_table_up_to_max_restarts(restart):
    got = tuple(should_rerun(restart, code, 1, 2) for code in (CRASH, 0, SIGTERM))
    assert got == TABLE[restart]
    assert not any(should_rerun(restart, code, 3, 2) for code in (CRASH, 0, SIGTERM))
    assert not should_rerun(restart, CRASH, 1, 0)


def test_a_crash_loop_backs_off_and_a_process_that_lived_resets_it():
    clock = FakeClock()
    rng = random.Random(5)
    deaths, delays = 0, []
    for _ in range(8):
        started = clock()
        clock.advance(0.05)  # dies almost at once
        deaths = quick_deaths_after(deaths, clock() - started)
        delays.append(restart_delay(deaths, rng))
        clock.advance(delays[-1])
    # The first is replaced at once; then the one backoff's ceilings, each jittered
    # within its upper half.
    ceilings = [0.0, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert delays[0] == 0.0
    assert all(c / 2 <= d <= c for d, c in zip(delays[1:], ceilings[1:], strict=True)), delays
    started = clock()
    clock.advance(QUICK_DEATH_SECONDS)  # this one lived long enough
    deaths = quick_deaths_after(deaths, clock() - started)
    assert (deaths, restart_delay(deaths, rng)) == (0, 0.0)
    assert restart_delay(quick_deaths_after(deaths, 0.01), rng) == 0.0


def grows(
    live: int = 2,
    starting: int = 0,
    queued: int = 1,
    busy: int = 2,
    scale_up_at: float = 0.75,
    closing: bool = False,
) -> bool:
    return should_scale_up(
        live=live,
        starting=starting,
        queued=queued,
        busy=busy,
        max_size=4,
        scale_up_at=scale_up_at,
        closing=closing,
    )


def test_scale_up_only_when_work_waits_busy_share_is_reached_and_room_is_left():
    assert grows()
    assert not grows(closing=True)
    assert not grows(queued=0)
    assert not grows(busy=1)  # 50 % busy < 75 %
    assert grows(busy=1, scale_up_at=0.5)
    assert not grows(live=3, starting=1)  # at max_size with the one starting
    assert not grows(starting=1)  # the one starting takes the one waiting task
    assert grows(starting=1, queued=2)
    assert grows(live=0, busy=0)  # an empty pool always grows


def test_idle_processes_retire_oldest_first_after_the_timeout_down_to_min():
    clock = FakeClock()
    idle_since = {"a": clock(), "b": clock() + 1, "c": clock() + 2}
    idle = [(name, since) for name, since in idle_since.items()]

    def retire(live: int, min_size: int) -> list[str]:
        return idle_to_retire(idle, now=clock(), idle_timeout=10, live=live, min_size=min_size)

    clock.advance(9.5)
    assert retire(live=4, min_size=0) == []  # no one idle for 10 s yet
    clock.advance(1.6)  # a idle 11.1 s, b 10.1 s, c 9.1 s
    assert retire(live=4, min_size=0) == ["a", "b"]
    assert retire(live=4, min_size=3) == ["a"]  # one busy process + a, b, c: keep 3
    assert retire(live=3, min_size=3) == []
    clock.advance(100)
    assert retire(live=3, min_size=1) == ["a", "b"]
    assert scale_down_tick(30) == 1.0 and scale_down_tick(0.5) == 0.125
