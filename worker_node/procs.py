"""Process trees through psutil: kill a whole tree, describe an exit, report a process.

One code path for Linux, macOS and Windows. Every process the worker starts
leads its own process group (a new session on POSIX), so killing the group takes
its helpers with it; descendants that left the group are found through psutil
first and killed by pid, so nothing is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVarTuple

import psutil

__all__ = [
    "CpuSampler",
    "ProcessReport",
    "children_of",
    "describe_exit",
    "kill_tree",
    "new_group_kwargs",
    "report",
    "use_pidfd_child_watcher",
]

POSIX = os.name == "posix"
_Ts = TypeVarTuple("_Ts")
# Signals the kernel sends for a passed rlimit.
_WHY = {"SIGXCPU": " (over its CPU time limit)", "SIGXFSZ": " (over its file size limit)"}


def new_group_kwargs() -> dict[str, object]:
    """Popen keyword arguments that make the child lead its own process group."""
    if POSIX:
        return {"start_new_session": True}
    return {"creationflags": 0x00000200}  # CREATE_NEW_PROCESS_GROUP


if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):

    class _PidfdWatcher(asyncio.PidfdChildWatcher):
        """asyncio's pidfd watcher, on whichever loop starts the child, as asyncio has it
        from Python 3.12 on (3.11's is tied to one attached loop)."""

        def __init__(self) -> None:
            super().__init__()
            self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}

        def is_active(self) -> bool:
            return True

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            pass

        def close(self) -> None:
            pass

        def add_child_handler(
            self, pid: int, callback: Callable[[int, int, *_Ts], object], *args: *_Ts
        ) -> None:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(pid)
            self._waiting[pid] = loop, pidfd
            loop.add_reader(pidfd, self._reap, pid, lambda code: callback(pid, code, *args))

        def remove_child_handler(self, pid: int) -> bool:
            found = self._waiting.pop(pid, None)
            if found is None:
                return False
            loop, pidfd = found
            loop.remove_reader(pidfd)
            os.close(pidfd)
            return True

        def _reap(self, pid: int, report: Callable[[int], object]) -> None:
            self.remove_child_handler(pid)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:  # reaped elsewhere
                report(255)
            else:
                report(os.waitstatus_to_exitcode(status))


def use_pidfd_child_watcher() -> None:
    """Wait for child processes through pidfds on Python 3.11 / Linux, as 3.12 does itself.

    3.11's default watcher starts a thread per child and holds the event loop until
    that thread runs: on a busy machine the largest cost of running a short command.
    Does nothing where pidfds are missing (macOS, old kernels) or not needed (3.12+).
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    policy = asyncio.get_event_loop_policy()
    if not isinstance(policy, asyncio.DefaultEventLoopPolicy):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel before 5.3, or a sandbox that refuses pidfd_open
        return
    if not isinstance(policy.get_child_watcher(), _PidfdWatcher):
        policy.set_child_watcher(_PidfdWatcher())


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant; missing ones are fine."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if POSIX:
        with contextlib.suppress(OSError):
            # The pool and exec processes lead their own group: pgid == pid.
            os.killpg(pid, signal.SIGKILL)
    for proc in [*descendants]:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(psutil.Error, OSError):
        psutil.Process(pid).kill()


def describe_exit(returncode: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL``: how a process ended, for messages."""
    if returncode is None:
        return "still running"
    if returncode < 0 and sys.platform != "win32":
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"killed by signal {-returncode}"
        return f"killed by {name}{_WHY.get(name, '')}"
    return f"exit code {returncode}"


@dataclass(frozen=True, slots=True)
class ProcessReport:
    """What ListProcesses shows of one process."""

    pid: int
    ppid: int
    cmdline: tuple[str, ...]
    rss_bytes: int
    cpu_percent: float
    status: str


class CpuSampler:
    """Keeps psutil handles between calls so CPU % covers the time since the last look."""

    def __init__(self) -> None:
        self._handles: dict[int, psutil.Process] = {}

    def handle(self, pid: int) -> psutil.Process:
        proc = self._handles.get(pid)
        if proc is None or not proc.is_running():
            proc = psutil.Process(pid)
            self._handles[pid] = proc
        return proc

    def forget_missing(self, alive: set[int]) -> None:
        for pid in [p for p in self._handles if p not in alive]:
            del self._handles[pid]


def report(sampler: CpuSampler, pid: int) -> ProcessReport | None:
    """A snapshot of ``pid``, or None when it is gone."""
    try:
        proc = sampler.handle(pid)
        with proc.oneshot():
            try:
                cmdline = tuple(proc.cmdline())
            except psutil.AccessDenied:
                cmdline = (proc.name(),)
            return ProcessReport(
                pid=pid,
                ppid=proc.ppid(),
                cmdline=cmdline,
                rss_bytes=proc.memory_info().rss,
                cpu_percent=proc.cpu_percent(None),
                status=str(proc.status()),
            )
    except psutil.Error:
        return None


def children_of(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid``."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []
