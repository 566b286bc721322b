"""Resource limits: rlimits where the OS enforces them, a psutil watchdog elsewhere.

Linux enforces address space, CPU time and open files through rlimits; macOS
enforces CPU time and open files but not address space; Windows has no
rlimits. What the OS cannot enforce, ``Watchdog`` polls for and enforces by
killing the process tree. rlimits are set by the limited process itself (pool
processes at start, commands through a tiny exec trampoline), never through
``preexec_fn``, which is unsafe in a process with threads such as gRPC's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import psutil

__all__ = ["LimitSpec", "Watchdog", "apply_rlimits", "rlimit_argv", "split_limits"]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024

try:
    import resource

    HAVE_RLIMIT = True
except ImportError:  # Windows
    HAVE_RLIMIT = False

# Address-space limits are accepted but not enforced by macOS.
_RLIMIT_MEMORY = HAVE_RLIMIT and sys.platform.startswith("linux")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits in base units; None means unlimited."""

    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.memory_bytes, self.cpu_seconds, self.open_files))

    def encode(self) -> str:
        parts = []
        if self.memory_bytes is not None:
            parts.append(f"AS={self.memory_bytes}")
        if self.cpu_seconds is not None:
            parts.append(f"CPU={self.cpu_seconds}")
        if self.open_files is not None:
            parts.append(f"NOFILE={self.open_files}")
        return ",".join(parts)


def split_limits(
    memory_mb: int | None, cpu_seconds: int | None, open_files: int | None
) -> tuple[LimitSpec, LimitSpec]:
    """(what rlimits enforce here, what the watchdog must enforce here)."""
    memory = None if memory_mb is None else memory_mb * MIB
    if not HAVE_RLIMIT:
        return LimitSpec(), LimitSpec(memory, cpu_seconds, open_files)
    if _RLIMIT_MEMORY:
        return LimitSpec(memory, cpu_seconds, open_files), LimitSpec()
    return LimitSpec(None, cpu_seconds, open_files), LimitSpec(memory_bytes=memory)


def apply_rlimits(spec: LimitSpec) -> None:
    """Set rlimits on this process (called by a pool process at start)."""
    if not HAVE_RLIMIT or not spec.any:
        return
    _set_rlimits(spec.encode())


def _set_rlimits(encoded: str) -> None:
    """Set the rlimits named in ``encoded`` (``AS=...,CPU=...``) on this process.

    Its source is also the exec trampoline's (``_TRAMPOLINE``), so it may use only
    ``resource`` and builtins.
    """
    for item in filter(None, encoded.split(",")):
        name, value = item.split("=")
        soft = int(value)
        hard = soft + 1 if name == "CPU" else soft
        which = getattr(resource, "RLIMIT_" + name)
        cur_hard = resource.getrlimit(which)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))


# Run by `python -I -S -c`: set the limits named in argv[1], then become the command.
_TRAMPOLINE = (
    "import os, resource, sys\n"
    + inspect.getsource(_set_rlimits)
    + "_set_rlimits(sys.argv[1])\nos.execvp(sys.argv[2], sys.argv[2:])\n"
)


def rlimit_argv(spec: LimitSpec, argv: list[str]) -> list[str]:
    """``argv`` wrapped so that it runs under ``spec``'s rlimits (unchanged when none)."""
    if not spec.any:
        return argv
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, spec.encode(), *argv]


def _open_files(proc: psutil.Process) -> int:
    if sys.platform == "win32":
        return int(proc.num_handles())
    return int(proc.num_fds())


class Watchdog:
    """Polls one process tree and kills it when it passes a limit.

    ``on_exceeded`` gets a one-line reason and must kill the tree; the watchdog
    then stops. It also stops when the process is gone or ``stop()`` is called.
    """

    def __init__(
        self,
        pid: int,
        spec: LimitSpec,
        on_exceeded: Callable[[str], None],
        *,
        interval: float = 0.2,
    ) -> None:
        self._pid = pid
        self._spec = spec
        self._on_exceeded = on_exceeded
        self._interval = interval
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
        if spec.cpu_seconds is not None:
            cpu = sum(sum(p.cpu_times()[:2]) for p in tree)
            if cpu > spec.cpu_seconds:
                return f"CPU time {cpu:.1f}s is over its limit of {spec.cpu_seconds}s"
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
