"""The local-mesh supervisor, with real `shoal` children."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shoal_cli.mesh.supervisor import ChildSpec, Restart, StartError, Supervisor

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


def registry_spec(name: str, restart: Restart = Restart.ON_FAILURE) -> ChildSpec:
    return ChildSpec(
        name=name,
        argv=[*SHOAL, "registry", "--listen", "127.0.0.1:0", "--grace", "1"],
        restart=restart,
        stop_grace=3.0,
    )


async def wait_for(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_children_start_serve_and_stop(tmp_path: Path) -> None:
    events: list[str] = []
    sup = Supervisor(tmp_path, events.append)
    first = await sup.start(registry_spec("reg-a"))
    second = await sup.start(registry_spec("reg-b"))
    assert first.address.startswith("127.0.0.1:") and first.address != second.address
    pids = [first.pid, second.pid]
    assert all(psutil.pid_exists(pid) for pid in pids)
    await sup.stop([[second], [first]])
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )
    assert (tmp_path / "reg-a.log").exists()
    assert events == []


# A child that records, in a file shared by all, when it is told to stop and when it
# exits; with partners it exits only once they were all told too (so a group stopped
# one by one instead of together would never get past its first member).
RECORDER = textwrap.dedent("""
    import signal, sys, time
    name, record, partners = sys.argv[1], sys.argv[2], sys.argv[3:]
    def note(what):
        with open(record, "a") as f:
            f.write(f"{name} {what}\\n")
    def stop(*_):
        note("stopping")
        while not all(f"{p} stopping" in open(record).read() for p in partners):
            time.sleep(0.01)
        note("exits")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print(f"{name} serving on 127.0.0.1:1", flush=True)
    while True:
        time.sleep(1)
""")


def recorder(tmp_path: Path, name: str, *partners: str) -> ChildSpec:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    argv = [sys.executable, str(script), name, str(tmp_path / "record"), *partners]
    return ChildSpec(name=name, argv=argv, stop_grace=10.0)


async def test_stop_goes_group_by_group_in_the_order_given(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda _: None)
    first = await sup.start(recorder(tmp_path, "first"))
    b = await sup.start(recorder(tmp_path, "b", "c"))
    c = await sup.start(recorder(tmp_path, "c", "b"))
    await sup.stop([[b, c], [first]])
    lines = (tmp_path / "record").read_text().splitlines()
    # b and c together (both told before either exits), and first only after both exited.
    assert sorted(lines[:2]) == ["b stopping", "c stopping"], lines
    assert sorted(lines[2:4]) == ["b exits", "c exits"], lines
    assert lines[4:] == ["first stopping", "first exits"], lines


async def test_stop_without_groups_goes_newest_first(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda _: None)
    for name in ("old", "mid", "new"):
        await sup.start(recorder(tmp_path, name))
    await sup.stop()
    lines = (tmp_path / "record").read_text().splitlines()
    assert lines == [f"{n} {what}" for n in ("new", "mid", "old") for what in ("stopping", "exits")]


async def test_a_killed_child_is_restarted(tmp_path: Path) -> None:
    events: list[str] = []
    sup = Supervisor(tmp_path, events.append)
    child = await sup.start(registry_spec("reg"))
    old_pid = child.pid
    os.kill(old_pid, signal.SIGKILL)
    await wait_for(lambda: child.restarts == 1)
    assert child.pid != old_pid and psutil.pid_exists(child.pid)
    said = re.fullmatch(r"reg was killed by SIGKILL; restarting in (\d\.\d)s", events[0])
    # The first pause of the restart backoff: jittered within [0.25, 0.5] s.
    assert said is not None and 0.2 <= float(said.group(1)) <= 0.5, events[0]
    assert events[1].startswith(f"reg restarted (pid {child.pid}) on 127.0.0.1:")
    await sup.stop()


async def test_restart_never_leaves_it_stopped(tmp_path: Path) -> None:
    events: list[str] = []
    sup = Supervisor(tmp_path, events.append)
    child = await sup.start(registry_spec("reg", Restart.NEVER))
    child.proc.send_signal(signal.SIGTERM)  # a clean exit (0)
    await wait_for(lambda: bool(events))
    assert events == ["reg exited (0); restart policy never: left stopped"]
    await sup.stop()


async def test_a_child_that_fails_to_start_is_a_clear_error(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda _: None)
    bad = ChildSpec(name="broken", argv=[*SHOAL, "registry", "--listen", "nowhere"])
    with pytest.raises(StartError, match=r"broken did not start \(exited with status 2\); see "):
        await sup.start(bad)
    assert "must be host:port" in (tmp_path / "broken.log").read_text()
    await sup.stop()


def test_children_drain_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from shoal_cli.mesh.supervisor import ChildSpec, Supervisor
        async def main():
            sup = Supervisor(Path({str(tmp_path)!r}), print)
            child = await sup.start(ChildSpec(name="reg", argv={SHOAL!r} + [
                "registry", "--listen", "127.0.0.1:0"]))
            print(child.pid, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    registry_pid = int(proc.stdout.readline())
    proc.kill()  # no chance to stop its children
    proc.wait()
    proc.stdout.close()
    registry = psutil.Process(registry_pid)
    registry.wait(timeout=15)  # it notices the supervisor is gone and drains
    assert not psutil.pid_exists(registry_pid)
