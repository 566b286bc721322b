"""Process trees through psutil: kill a whole tree, describe an exit, report a process.

One code path for Linux, macOS and Windows. Every process the worker starts
leads its own process group (a new session on POSIX), so killing the group takes
its helpers with it; descendants that left the group are found through psutil
first and killed by pid, so nothing is orphaned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass

import psutil

__all__ = [
    "CpuSampler",
    "ProcessReport",
    "children_of",
    "describe_exit",
    "kill_tree",
    "new_group_kwargs",
    "report",
]

POSIX = os.name == "posix"
# Signals the kernel sends for a passed rlimit.
_WHY = {"SIGXCPU": " (over its CPU time limit)", "SIGXFSZ": " (over its file size limit)"}


def new_group_kwargs() -> dict[str, object]:
    """Popen keyword arguments that make the child lead its own process group."""
    if POSIX:
        return {"start_new_session": True}
    return {"creationflags": 0x00000200}  # CREATE_NEW_PROCESS_GROUP


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
