"""CPU a container used, from its cgroup's counters, and what its short-lived tasks used.

A container health check runs as a new process in the container's cgroup every few
seconds, while the service's own threads live on. So over a window, the CPU of the
cgroup minus the CPU of the threads alive at both ends is what the tasks that came
and went used: the probes (and anything else short-lived, so never less than them).
cgroup v1 (``cpuacct``) and v2 (``cpu.stat``) are both read; the cgroup is found from
the container's main process, so no Docker layout is assumed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Snapshot", "main_pid", "short_lived_cpu", "snapshot"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def main_pid(container: str) -> int:
    """The host pid of the container's first process (its init)."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Pid}}", container],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout)


def _cgroup_dir(pid: int) -> tuple[Path, bool]:
    """The directory holding the CPU counter of ``pid``'s cgroup, and whether it is v2."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            return CGROUP_ROOT / controllers / path.lstrip("/"), False
        if controllers == "":
            unified = CGROUP_ROOT / path.lstrip("/")
            if (unified / "cpu.stat").exists():
                return unified, True
    raise RuntimeError(f"no CPU accounting cgroup for pid {pid}")


def _usage_ns(cgroup: Path, v2: bool) -> int:
    if not v2:
        return int((cgroup / "cpuacct.usage").read_text())
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value) * 1000
    raise RuntimeError(f"{cgroup}/cpu.stat has no usage_usec")


def _threads(cgroup: Path, v2: bool) -> dict[int, int]:
    """Every thread in the cgroup and its CPU time so far (ns, from schedstat)."""
    listing = cgroup / ("cgroup.threads" if v2 else "tasks")
    found = {}
    for tid in listing.read_text().split():
        try:
            found[int(tid)] = int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError):
            continue  # it ended between the listing and the read
    return found


@dataclass(frozen=True)
class Snapshot:
    usage_ns: int
    threads: dict[int, int]


def snapshot(container: str) -> Snapshot:
    cgroup, v2 = _cgroup_dir(main_pid(container))
    # Threads first: CPU a thread uses after its reading still shows in the later total.
    threads = _threads(cgroup, v2)
    return Snapshot(_usage_ns(cgroup, v2), threads)


def short_lived_cpu(before: Snapshot, after: Snapshot) -> int:
    """Nanoseconds of CPU used between the snapshots by threads not alive at both."""
    lived = sum(after.threads[t] - before.threads[t] for t in before.threads.keys() & after.threads)
    return max(0, after.usage_ns - before.usage_ns - lived)
