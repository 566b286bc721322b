"""`shoal up` stops its whole mesh on a signal, whatever state its output is in.

At a terminal, Ctrl-C reaches the whole foreground process group: in
``shoal up 2>&1 | tee log`` the ``tee`` dies with the same signal, so by the time
``shoal up`` handles it, its output is a pipe without a reader. These tests close
the reader first, then signal, and check that ``shoal up`` exits and that nothing it
started is left: neither the children it knew of nor anything carrying its pid in
``SHOAL_PARENT_PID``. A Ctrl-C while the mesh is still starting leaves nothing either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from shoal_cli.mesh.plan import plan_mesh
from shoal_cli.mesh.supervisor import Restart
from shoal_cli.mesh.up import RunningMesh, run_mesh
from tests.shoal_cli.conftest import SHOAL, call_in_flight, wait_for_text

READY = b"Press Ctrl-C to stop everything"


def read_until(fd: int, marker: bytes, timeout: float = 90.0) -> bytes:
    """Read ``fd`` until ``marker`` shows; everything read so far."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {marker!r} in {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:  # a pty whose other side every process closed: EIO
                raise AssertionError(
                    f"output ended ({exc}) before {marker!r}: {seen[-2000:]!r}"
                ) from None
            assert chunk, f"output ended before {marker!r}: {seen[-2000:]!r}"
            seen += chunk
    return seen


def started_by(pid: int) -> list[psutil.Process]:
    """Every live process ``shoal up`` (pid) started, wherever it was reparented to."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SHOAL_PARENT_PID") == str(pid) and proc.status() != "zombie":
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def survivors(known: list[psutil.Process], up_pid: int) -> list[psutil.Process]:
    left = {p.pid: p for p in started_by(up_pid)}
    for proc in known:
        try:
            if proc.is_running() and proc.status() != "zombie":
                left[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return list(left.values())


# The demo prints once a second: this long after its reader went away, it has written
# into the void at least once. Only how much the test covers depends on it, not whether
# the test passes.
DEMO_PRINTS = 2.5


def stop_without_a_reader(
    proc: subprocess.Popen[bytes],
    close_reader: Callable[[], None],
    stop: Callable[[], None],
    *,
    linger: float = 0.0,
) -> tuple[int | None, list[str]]:
    """Close the reader, wait ``linger`` s, ``stop``; ``shoal up``'s exit status and what
    survived it."""
    known = psutil.Process(proc.pid).children(recursive=True)
    assert known, "shoal up started no children"
    close_reader()
    time.sleep(linger)
    code: int | None = None
    try:
        stop()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        return code, [f"{p.pid} {p.name()}" for p in survivors(known, proc.pid)]
    finally:
        for p in survivors(known, proc.pid):
            p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def up_into_a_pipe(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``shoal up 2>&1 | reader`` once it is ready, and the address of each of its parts."""
    proc = subprocess.Popen(
        [*SHOAL, "up", "--workers", "1", "--base-port", "0", "--run-dir", str(tmp_path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SHOAL_LOG_LEVEL": "INFO"},
    )
    assert proc.stdout is not None
    try:
        text = read_until(proc.stdout.fileno(), READY).decode()
    except BaseException:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise
    # The piped table: ROLE NAME ADDRESS PID LOG, tab-separated.
    rows = [line.split("\t") for line in text.splitlines() if line.count("\t") == 4]
    return proc, {row[1]: row[2] for row in rows[1:]}


def signal_to(proc: subprocess.Popen[bytes], name: str) -> Callable[[], None]:
    return lambda: proc.send_signal(getattr(signal, name))


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_up_stops_everything_when_its_pipe_reader_is_gone(tmp_path: Path, name: str) -> None:
    proc, _ = up_into_a_pipe(tmp_path)
    assert proc.stdout is not None
    code, left = stop_without_a_reader(proc, proc.stdout.close, signal_to(proc, name))
    assert code == 0 and not left, (code, left)


def test_a_second_ctrl_c_kills_everything_when_the_pipe_reader_is_gone(tmp_path: Path) -> None:
    proc, parts = up_into_a_pipe(tmp_path)
    assert proc.stdout is not None

    def twice() -> None:
        proc.send_signal(signal.SIGINT)
        # The first one was acted on: the client sidecar drains (held by the call).
        wait_for_text(tmp_path / "client-sidecar.log", "SIGTERM: draining")
        proc.send_signal(signal.SIGINT)

    with call_in_flight(parts["client-sidecar"], parts["worker-1"]):
        code, left = stop_without_a_reader(proc, proc.stdout.close, twice)
    assert code == 0 and not left, (code, left)
    for name in ("sidecar-1", "worker-1", "registry"):  # killed, never asked to drain
        assert "draining" not in (tmp_path / f"{name}.log").read_text(), name


def test_up_demo_stops_everything_when_its_pipe_reader_is_gone(tmp_path: Path) -> None:
    proc, _ = up_into_a_pipe(tmp_path, "--demo")
    assert proc.stdout is not None
    read_until(proc.stdout.fileno(), b"demo: ")  # the demo is printing
    code, left = stop_without_a_reader(
        proc, proc.stdout.close, signal_to(proc, "SIGINT"), linger=DEMO_PRINTS
    )
    assert code == 0 and not left, (code, left)


def test_up_demo_live_tables_stop_everything_when_the_terminal_is_gone(tmp_path: Path) -> None:
    # A terminal (so the demo draws its live tables) that then goes away: writes fail (EIO).
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*SHOAL, "up", "--workers", "1", "--base-port", "0", "--run-dir", str(tmp_path)]
            + ["--demo"],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
        )
    finally:
        os.close(slave)
    try:
        read_until(master, READY)
        read_until(master, b"req/s")  # the live table is up
    except BaseException:
        proc.kill()
        proc.wait()
        os.close(master)
        raise
    code, left = stop_without_a_reader(
        proc, lambda: os.close(master), signal_to(proc, "SIGINT"), linger=DEMO_PRINTS
    )
    assert code == 0 and not left, (code, left)


def test_ctrl_c_while_the_mesh_starts_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*SHOAL, "up", "--workers", "1", "--base-port", "0", "--run-dir", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # A child exists: the mesh is starting (the one just spawned is not ready yet).
        deadline = time.monotonic() + 30
        while not psutil.Process(proc.pid).children():
            assert time.monotonic() < deadline, "shoal up started no child"
            time.sleep(0.01)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    code, left = stop_without_a_reader(proc, lambda: None, signal_to(proc, "SIGINT"))
    assert code == 0 and not left, (code, left)


async def test_a_failing_demo_does_not_keep_the_mesh_up(tmp_path: Path) -> None:
    plan = plan_mesh(
        workers=1,
        base_port=0,
        lb=None,
        restart=Restart.NEVER,
        mesh_file=None,
        sections={},
    )
    started: list[psutil.Process] = []

    def on_ready(mesh: RunningMesh) -> None:
        started.extend(psutil.Process().children(recursive=True))
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, handled by run_mesh

    async def broken_demo() -> None:
        raise RuntimeError("the demo broke")

    try:
        await run_mesh(
            plan,
            tmp_path,
            on_event=lambda _: None,
            on_ready=on_ready,
            while_running=lambda _: asyncio.ensure_future(broken_demo()),
        )
        assert started
        assert not [p for p in started if p.is_running() and p.status() != "zombie"]
    finally:
        for p in psutil.Process().children(recursive=True):  # only when it failed
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
