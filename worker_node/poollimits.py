"""A pool's limits: rlimits each process sets at start, CPU budgets per task, watchdogs.

Address space and open files are rlimits the pool process sets on itself when
it starts. CPU time is a budget per task (see ``limits``): the process keeps it
itself where rlimits exist; elsewhere the watchdog polls for it, along with
whatever else the OS cannot enforce.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker_node.config import FunctionConfig, Limits
from worker_node.limits import (
    HAVE_RLIMIT,
    LimitSpec,
    Watchdog,
    cpu_budget,
    resolve_limits,
    split_limits,
)
from worker_node.poolproc import PoolProcess

__all__ = ["PoolLimits"]


class PoolLimits:
    """What a pool's processes are limited to, and the watchdogs that enforce the rest."""

    def __init__(self, limits: Limits, functions: Mapping[str, FunctionConfig]) -> None:
        process = resolve_limits(limits, timeout=0)
        self._rlimits, self._watched = split_limits(
            LimitSpec(memory_bytes=process.memory_bytes, open_files=process.open_files)
        )
        self._budgets = [cpu_budget(limits, f.timeout) for f in functions.values()]
        self._watch_tasks = not HAVE_RLIMIT and any(b is not None for b in self._budgets)
        self._watchdogs: dict[PoolProcess, Watchdog] = {}

    def init_spec(self) -> dict[str, Any]:
        """The limits part of a pool process's INIT frame (read by ``child``)."""
        return {
            "limits": {
                "memory_bytes": self._rlimits.memory_bytes,
                "open_files": self._rlimits.open_files,
            },
            "cpu_budgets": self._budgets if HAVE_RLIMIT else [None] * len(self._budgets),
        }

    def watch(self, proc: PoolProcess) -> None:
        """Start a watchdog on a new process if anything is left for one to enforce."""
        if not self._watched.any and not self._watch_tasks:
            return
        watchdog = Watchdog(
            proc.pid,
            self._watched,
            lambda _why: proc.kill("limit"),
            task_budget=(lambda: self._head_budget(proc)) if self._watch_tasks else None,
        )
        self._watchdogs[proc] = watchdog
        watchdog.start()

    def unwatch(self, proc: PoolProcess) -> None:
        watchdog = self._watchdogs.pop(proc, None)
        if watchdog is not None:
            watchdog.stop()

    def unwatch_all(self) -> None:
        for proc in list(self._watchdogs):
            self.unwatch(proc)

    def _head_budget(self, proc: PoolProcess) -> tuple[object, int | None]:
        if not proc.inflight:
            return None, None
        head = proc.inflight[0]
        return head, self._budgets[head.function]
