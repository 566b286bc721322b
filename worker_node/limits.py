"""Resource limits: rlimits where the OS enforces them, a psutil watchdog elsewhere.

Every command and pool process runs under limits: what its config entry says,
or the defaults (``DEFAULT_MEMORY_MB`` of address space, ``DEFAULT_OPEN_FILES``
open files, and CPU time its timeout times the machine's CPUs, which never ends
work its deadline would have let finish yet bounds whatever escapes the
deadline's kill); ``unlimited`` lifts one limit (``resolve_limits``).

Linux enforces address space, CPU time and open files through rlimits; macOS
enforces CPU time and open files but not address space; Windows has no
rlimits. What the OS cannot enforce, ``Watchdog`` polls for and enforces by
killing the process tree.

rlimits are never set through ``preexec_fn``, which is unsafe in a process with
threads such as gRPC's, and a command never runs a single instruction without
them. On Linux a spawner process that holds them starts it, so it inherits them
(``spawn``); elsewhere, or for limits too small for a spawner, it starts under
a trampoline that sets them and then execs it: util-linux's ``prlimit``, or
where that is missing ``python -I -S`` (an interpreter start per command). Soft
and hard limits are set alike (CPU's hard one a second later, so SIGXCPU comes
first), capped at the hard limits the worker itself has, so a command cannot
raise them again.

In pool processes CPU time is a budget per task, not per process: a warm process
runs many tasks, and a lifetime RLIMIT_CPU would kill a healthy one once its
tasks together had used the limit. Before each task the process moves its own
soft RLIMIT_CPU to the CPU it has used so far plus that task's budget
(``TaskCpuLimit``: a clock read at most every 10 ms, a setrlimit only when
the whole second moves). A task that runs past it gets SIGXCPU, whose default action ends
the process; the pool fails that task and replaces the process. The hard limit
stays as it was so that the soft one can move up again, which leaves the budget
a guard against runaway code, not against a task that raises its own limit. A
thread a task leaves spinning is stopped the same way once it passes the last
task's budget. Without rlimits the watchdog keeps the budget by polling, counting
CPU from the moment a task reaches the head of its process (``TaskCpu``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # pool processes import this module; they need not load pydantic
    from worker_node.config import Limits

__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_OPEN_FILES",
    "HAVE_RLIMIT",
    "UNLIMITED",
    "LimitSpec",
    "TaskCpu",
    "TaskCpuLimit",
    "Watchdog",
    "apply_rlimits",
    "cpu_budget",
    "encode_rlimits",
    "resolve_limits",
    "rlimit_argv",
    "rlimit_pairs",
    "split_limits",
]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
UNLIMITED = "unlimited"
# What a limit left out of an entry is. Address space, not memory in use: Python with
# numpy-sized imports reserves a few hundred MiB, and OpenBLAS tens more per thread.
DEFAULT_MEMORY_MB = 4096
DEFAULT_OPEN_FILES = 1024

try:
    import resource

    HAVE_RLIMIT = True
except ImportError:  # Windows
    HAVE_RLIMIT = False

_LINUX = sys.platform.startswith("linux")
# Address-space limits are accepted but not enforced by macOS.
_RLIMIT_MEMORY = HAVE_RLIMIT and _LINUX
# Fixed places only: a prlimit found through PATH could be anyone's.
_PRLIMIT = next(
    (p for p in ("/usr/bin/prlimit", "/bin/prlimit") if _LINUX and os.access(p, os.X_OK)), None
)


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits in base units; None means unlimited."""

    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.memory_bytes, self.cpu_seconds, self.open_files))


def _pick(value: int | str | None, default: int | None) -> int | None:
    # An entry's limit: left out takes the default, "unlimited" (the only str) is none.
    if value is None:
        return default
    return value if isinstance(value, int) else None


def cpu_budget(limits: Limits, timeout: float) -> int | None:
    """CPU seconds for work with this ``timeout``: the entry's, or timeout x CPUs; None: none."""
    return _pick(limits.cpu_seconds, max(1, math.ceil(timeout * (os.cpu_count() or 1))))


def resolve_limits(limits: Limits, timeout: float) -> LimitSpec:
    """An entry's limits with the defaults filled in (see the module docstring)."""
    memory = _pick(limits.max_memory_mb, DEFAULT_MEMORY_MB)
    return LimitSpec(
        memory_bytes=None if memory is None else memory * MIB,
        cpu_seconds=cpu_budget(limits, timeout),
        open_files=_pick(limits.open_files, DEFAULT_OPEN_FILES),
    )


def split_limits(spec: LimitSpec) -> tuple[LimitSpec, LimitSpec]:
    """(what rlimits enforce here, what the watchdog must enforce here)."""
    if not HAVE_RLIMIT:
        return LimitSpec(), spec
    if _RLIMIT_MEMORY:
        return spec, LimitSpec()
    return (
        LimitSpec(None, spec.cpu_seconds, spec.open_files),
        LimitSpec(memory_bytes=spec.memory_bytes),
    )


def rlimit_pairs(spec: LimitSpec) -> list[tuple[str, int, int]]:
    """(name, soft, hard) for each limit in ``spec``, capped at this process's hard limits."""
    pairs = []
    for name, value in (
        ("AS", spec.memory_bytes),
        ("CPU", spec.cpu_seconds),
        ("NOFILE", spec.open_files),
    ):
        if value is None:
            continue
        soft, hard = value, value + 1 if name == "CPU" else value
        cur_hard = resource.getrlimit(getattr(resource, "RLIMIT_" + name))[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        pairs.append((name, soft, hard))
    return pairs


def _set_rlimits(encoded: str) -> None:
    """Set the rlimits named in ``encoded`` (``AS=soft:hard,CPU=...``) on this process.

    Its source is also the exec trampoline's (``_TRAMPOLINE``), so it may use only
    ``resource`` and builtins.
    """
    for item in filter(None, encoded.split(",")):
        name, value = item.split("=")
        soft, hard = value.split(":")
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(soft), int(hard)))


def encode_rlimits(pairs: list[tuple[str, int, int]]) -> str:
    """``AS=soft:hard,...``: how the trampoline and the spawner are told their limits."""
    return ",".join(f"{name}={soft}:{hard}" for name, soft, hard in pairs)


def apply_rlimits(spec: LimitSpec) -> None:
    """Set rlimits on this process (called by a pool process at start)."""
    if HAVE_RLIMIT and spec.any:
        _set_rlimits(encode_rlimits(rlimit_pairs(spec)))


# Run by `python -I -S -c`: set the limits named in argv[1], then become the command.
_TRAMPOLINE = (
    "import os, resource, sys\n"
    + inspect.getsource(_set_rlimits)
    + "_set_rlimits(sys.argv[1])\nos.execvp(sys.argv[2], sys.argv[2:])\n"
)


def rlimit_argv(spec: LimitSpec, argv: list[str]) -> list[str]:
    """``argv`` wrapped so that it runs under ``spec``'s rlimits (unchanged when none)."""
    if not HAVE_RLIMIT or not spec.any:
        return argv
    pairs = rlimit_pairs(spec)
    if _PRLIMIT is not None:
        options = [f"--{name.lower()}={soft}:{hard}" for name, soft, hard in pairs]
        return [_PRLIMIT, *options, "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, encode_rlimits(pairs), *argv]


class TaskCpuLimit:
    """Gives each task of a pool process its own CPU budget (see the module docstring).

    ``budgets`` holds one budget per function, None for no limit. Call
    ``before(index, now)`` in the pool process before running function ``index``,
    with ``now`` from ``time.perf_counter()``. Reading this process's CPU clock is a
    system call, so a reading up to ``REREAD`` seconds old is reused: in that time
    the process cannot have used more CPU than ``REREAD`` per thread, which the
    rounding up to the next whole second more than makes up for.
    """

    REREAD = 0.01

    def __init__(self, budgets: Sequence[int | None]) -> None:
        self._budgets = list(budgets)
        self._hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        self._soft: int | None = None
        self._used = 0
        self._read_at = -math.inf

    def before(self, index: int, now: float) -> None:
        budget = self._budgets[index]
        hard = self._hard
        if budget is None:
            soft = hard
        else:
            if now - self._read_at > self.REREAD:
                self._used = math.ceil(time.process_time())
                self._read_at = now
            soft = self._used + budget
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
        if soft != self._soft:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
            self._soft = soft


class TaskCpu:
    """CPU used by the task at the head of a process, from successive readings of its total."""

    def __init__(self) -> None:
        self._task: object = None
        self._start = 0.0

    def used(self, task: object, total: float) -> float | None:
        """CPU seconds since ``task`` (None: no task) was first seen at the head."""
        if task is None:
            self._task = None
            return None
        if task != self._task:
            self._task, self._start = task, total
        return total - self._start


def _open_files(proc: psutil.Process) -> int:
    if sys.platform == "win32":
        return int(proc.num_handles())
    return int(proc.num_fds())


class Watchdog:
    """Polls one process tree and kills it when it passes a limit.

    ``on_exceeded`` gets a one-line reason and must kill the tree; the watchdog
    then stops. It also stops when the process is gone or ``stop()`` is called.
    ``task_budget``, for a pool process, names the task at its head (None when
    idle) and that task's CPU budget: the tree may use that much CPU per task.
    """

    def __init__(
        self,
        pid: int,
        spec: LimitSpec,
        on_exceeded: Callable[[str], None],
        *,
        interval: float = 0.2,
        task_budget: Callable[[], tuple[object, int | None]] | None = None,
    ) -> None:
        self._pid = pid
        self._spec = spec
        self._on_exceeded = on_exceeded
        self._interval = interval
        self._task_budget = task_budget
        self._task_cpu = TaskCpu()
        self._task: asyncio.Task[None] | None = None
        self.reason: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watchdog-{self._pid}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def check(self, proc: psutil.Process) -> str | None:
        """The limit the tree is over, or None."""
        spec = self._spec
        tree = [proc, *proc.children(recursive=True)]
        if spec.memory_bytes is not None:
            rss = sum(p.memory_info().rss for p in tree)
            if rss > spec.memory_bytes:
                return (
                    f"memory {rss // MIB} MiB is over its limit of {spec.memory_bytes // MIB} MiB"
                )
        if spec.cpu_seconds is not None or self._task_budget is not None:
            cpu = sum(sum(p.cpu_times()[:2]) for p in tree)
            if spec.cpu_seconds is not None and cpu > spec.cpu_seconds:
                return f"CPU time {cpu:.1f}s is over its limit of {spec.cpu_seconds}s"
            if self._task_budget is not None:
                task, budget = self._task_budget()
                used = self._task_cpu.used(task, cpu)
                if budget is not None and used is not None and used > budget:
                    return f"the task's CPU time {used:.1f}s is over its limit of {budget}s"
        if spec.open_files is not None:
            files = _open_files(proc)
            if files > spec.open_files:
                return f"{files} open files are over the limit of {spec.open_files}"
        return None

    async def _run(self) -> None:
        try:
            proc = psutil.Process(self._pid)
            while True:
                try:
                    reason = self.check(proc)
                except psutil.Error:
                    return
                if reason is not None:
                    self.reason = reason
                    logger.warning("process %d: %s; killing it", self._pid, reason)
                    self._on_exceeded(reason)
                    return
                await asyncio.sleep(self._interval)
        except psutil.Error:
            return
