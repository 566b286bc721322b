"""What a proxy spends: CPU (user + system), context switches, RSS, from psutil and /proc.

CPU comes from each thread's ``/proc/PID/task/TID/schedstat`` (time on CPU, in
nanoseconds) where the kernel has it: psutil's user and system times move in
10 ms ticks, which over a run of a few thousand calls is a few percent of noise,
the size of the differences the bench must tell apart.

A ``Meter`` treats a proxy's processes as one (nginx: the master and its worker; two
proxies in a row: both), so a figure per call is the whole proxy's cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = ["MIB", "Meter", "Run", "Usage"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and context switches, summed over processes and threads."""

    cpu: float
    switches: int
    # CPU seconds by thread name (threads of one name summed): where the time goes.
    by_thread: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: Usage) -> Usage:
        names = self.by_thread.keys() | other.by_thread.keys()
        return Usage(
            self.cpu + other.cpu,
            self.switches + other.switches,
            {n: self.by_thread.get(n, 0.0) + other.by_thread.get(n, 0.0) for n in names},
        )

    def __sub__(self, other: Usage) -> Usage:
        names = self.by_thread.keys() | other.by_thread.keys()
        return Usage(
            self.cpu - other.cpu,
            self.switches - other.switches,
            {n: self.by_thread.get(n, 0.0) - other.by_thread.get(n, 0.0) for n in names},
        )


def _task_switches(task: Path) -> int:
    # /proc/PID/status counts the main thread only; the data plane runs on a thread of its
    # own, so every task is read.
    total = 0
    with contextlib.suppress(OSError):
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def _on_cpu(task: Path) -> float | None:
    """Seconds the task has run on a CPU (schedstat's first field), if the kernel says."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Meter:
    """The processes of one proxy (or of proxies in a row), measured together."""

    def __init__(self, pids: list[int]) -> None:
        procs: list[psutil.Process] = []
        for pid in pids:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        self.procs = procs
        self.peak_resettable = True

    def usage(self) -> Usage:
        cpu = 0.0
        switches = 0
        by_thread: dict[str, float] = {}
        for proc in self.procs:
            ticked = proc.cpu_times()
            exact = 0.0
            for thread in proc.threads():
                task = Path(f"/proc/{proc.pid}/task/{thread.id}")
                switches += _task_switches(task)
                ran = _on_cpu(task)
                if ran is None:
                    exact = -1.0e18  # no schedstat here: fall back to the ticks
                    ran = thread.user_time + thread.system_time
                exact += ran
                try:
                    name = (task / "comm").read_text().strip()
                except OSError:
                    continue
                by_thread[name] = by_thread.get(name, 0.0) + ran
            # The proxies' threads live as long as they do, so the live threads' sum is
            # the whole.
            cpu += exact if exact >= 0 else ticked.user + ticked.system
        return Usage(cpu, switches, by_thread)

    def rss(self) -> int:
        """Resident bytes now, summed (pages shared between nginx's processes count twice)."""
        return sum(proc.memory_info().rss for proc in self.procs)

    def reset_peak(self) -> None:
        """Start the peak RSS anew (writing 5 to clear_refs resets VmHWM, Linux 4.0+)."""
        for proc in self.procs:
            try:
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            except OSError:
                self.peak_resettable = False

    def peak_rss(self) -> int:
        """The highest resident bytes since ``reset_peak`` (VmHWM), summed."""
        return sum(_status_kib(proc.pid, "VmHWM") * 1024 for proc in self.procs)


@dataclass
class Run:
    """One target's figures in one round; ``None`` where a figure does not apply."""

    rate: float  # calls (or messages) per second
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us: float | None = None  # the proxy's user + system CPU per call
    switches: float | None = None  # the proxy's context switches per call
    ok: bool = True
    note: str = ""
    spent: Usage | None = None
