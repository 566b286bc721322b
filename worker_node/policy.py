"""The pool's and the command runner's decisions, as pure functions.

When to grow a pool, which idle processes to retire, whether a process or a
one-shot command that ended is started again, and after how long. Nothing here
touches asyncio, processes or the clock: callers pass what they saw (counts,
exit codes, times from ``time.monotonic()``) and do the I/O themselves, so the
rules are tested with plain numbers and a fake clock.

Restart policy, for a process or command that ended without the worker asking:

==============  ==========  =========  ===========================
policy          crash [1]_  exit 0     stopped (SIGTERM/SIGINT)
==============  ==========  =========  ===========================
never           no          no         no
on-failure      yes         no         no
always          yes         yes        yes
unless-stopped  yes         yes        no
==============  ==========  =========  ===========================

.. [1] a non-zero exit, a fatal signal, or a kill for a timeout or a limit.

A pool process that is not replaced leaves the pool smaller (possibly below
``min``) until work waits and scaling grows it again.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterable
from typing import Literal, TypeVar

from shoal_core.backoff import Backoff
from worker_node.config import RestartPolicy

__all__ = [
    "QUICK_DEATH_SECONDS",
    "ExitKind",
    "classify_exit",
    "exit_kind",
    "idle_to_retire",
    "quick_deaths_after",
    "restart_delay",
    "scale_down_tick",
    "should_rerun",
    "should_restart",
    "should_scale_up",
]

T = TypeVar("T")
ExitKind = Literal["retired", "failure", "clean", "stopped"]

_RESTART_ON: dict[str, frozenset[str]] = {
    "never": frozenset(),
    "on-failure": frozenset({"failure"}),
    "always": frozenset({"failure", "clean", "stopped"}),
    "unless-stopped": frozenset({"failure", "clean"}),
}
_STOP_SIGNALS = frozenset({-signal.SIGTERM, -signal.SIGINT})
# A pool process that dies sooner than this after it started counts as a quick death.
QUICK_DEATH_SECONDS = 1.0


def exit_kind(returncode: int) -> ExitKind:
    """How a process ended on its own: clean (exit 0), stopped (SIGTERM/SIGINT) or failure."""
    if returncode == 0:
        return "clean"
    return "stopped" if returncode in _STOP_SIGNALS else "failure"


def classify_exit(stop_reason: str | None, returncode: int | None) -> ExitKind:
    """A pool process's end: retired (the pool asked it to stop), or as ``exit_kind``.

    ``stop_reason`` is why the worker ended it; any reason but retirement or
    shutdown (a timeout, a limit) is a failure.
    """
    if stop_reason in ("retired", "shutdown"):
        return "retired"
    if stop_reason is not None or returncode is None:
        return "failure"
    return exit_kind(returncode)


def should_restart(policy: RestartPolicy, kind: ExitKind, *, closing: bool = False) -> bool:
    """Whether a pool process that ended this way is replaced (the table above)."""
    return not closing and kind != "retired" and kind in _RESTART_ON[policy]


def should_rerun(policy: RestartPolicy, returncode: int, attempts: int, max_restarts: int) -> bool:
    """Whether a one-shot command that exited with ``returncode`` after ``attempts`` runs again."""
    return attempts <= max_restarts and exit_kind(returncode) in _RESTART_ON[policy]


def quick_deaths_after(previous: int, lived: float) -> int:
    """The run of quick deaths once a process that lived ``lived`` seconds has died."""
    return previous + 1 if lived < QUICK_DEATH_SECONDS else 0


# A crash loop's pauses: the one backoff every retry loop uses, from 0.4 s up to 5 s.
CRASH_LOOP_BACKOFF = Backoff(initial=0.4, maximum=5.0)


def restart_delay(quick_deaths: int, rng: random.Random) -> float:
    """Seconds to wait before replacing a process, after ``quick_deaths`` quick deaths in a row.

    One quick death is replaced at once; a crash loop backs off (jittered) to 5 s.
    """
    if quick_deaths <= 1:
        return 0.0
    return CRASH_LOOP_BACKOFF.delay(quick_deaths - 2, rng)


def should_scale_up(
    *,
    live: int,
    starting: int,
    queued: int,
    busy: int,
    max_size: int,
    scale_up_at: float,
    closing: bool = False,
) -> bool:
    """Whether to start one more process now that ``queued`` tasks wait.

    Never past ``max_size`` (counting processes already starting), never when the
    ones starting will take all the waiting work, and only when the share of busy
    live processes has reached ``scale_up_at`` (an empty pool always grows).
    """
    if closing or live + starting >= max_size:
        return False
    if starting >= queued:
        return False
    return not live or busy / live >= scale_up_at


def idle_to_retire(
    idle: Iterable[tuple[T, float]], *, now: float, idle_timeout: float, live: int, min_size: int
) -> list[T]:
    """Which processes to retire, oldest idle first, without going below ``min_size``.

    ``idle`` holds (process, idle since) for each live process with nothing in
    flight; those idle for at least ``idle_timeout`` at ``now`` may go.
    """
    expired = sorted(
        ((since, i, proc) for i, (proc, since) in enumerate(idle) if now - since >= idle_timeout),
        key=lambda item: item[:2],
    )
    room = max(0, live - min_size)
    return [proc for _, _, proc in expired[:room]]


def scale_down_tick(idle_timeout: float) -> float:
    """How often to look for idle processes: often enough to retire them near on time."""
    return min(1.0, idle_timeout / 4)
