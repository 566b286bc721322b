"""Spawner processes: commands inherit their limits; nothing outlives its owner."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import psutil
import pytest

from protos import worker_pb2 as pb
from tests.worker_node.conftest import await_until, config, running
from worker_node.cmdproc import Command, start_spawned
from worker_node.spawn import Spawner, Spawners

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PY = sys.executable
LIMITS = "AS=1073741824:1073741824,CPU=20:21,NOFILE=100:100"
SHOW = (
    "import json, os, resource; print(json.dumps([os.getppid()] + "
    "[resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) for n in ('AS', 'CPU', 'NOFILE')]))"
)


async def _output(command: Command) -> tuple[bytes, int | None]:
    out = bytearray()
    while not command.finished:
        while command.chunks:
            out += command.take().data
        if not command.finished:
            await command.changed()
    command.release()
    return bytes(out), command.returncode


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_gone(pid: int) -> bool:
    return _gone(pid)


async def test_a_spawned_command_holds_the_spawners_limits_from_the_start():
    spawners = Spawners()
    try:
        spawner = await spawners.get(LIMITS, 20)
        command = await start_spawned(spawner, [PY, "-c", SHOW], None, None, b"")
        assert command is not None
        out, code = await _output(command)
        ppid, mem, cpu, files = json.loads(out)
        assert code == 0 and ppid == spawner.pid
        assert (mem, cpu, files) == ([1 << 30] * 2, [20, 21], [100, 100])
        cat = await start_spawned(spawner, ["cat"], None, None, b"fed through stdin")
        assert cat is not None and await _output(cat) == (b"fed through stdin", 0)
        with pytest.raises(FileNotFoundError):
            await start_spawned(spawner, ["/no/such/program"], None, None, b"")
        assert await spawners.get(LIMITS, 20) is spawner  # one spawner per set of limits
    finally:
        await spawners.close()
    assert _gone(spawner.pid)


async def test_a_spawner_past_half_its_cpu_limit_is_replaced_and_leaves_after_its_last_command():
    spawners = Spawners()
    try:
        first = await spawners.get(LIMITS, 20)
        first.retire_after = 0.0  # as if it had used half its CPU limit already
        sleeper = await start_spawned(
            first, [PY, "-c", "import time; time.sleep(0.5)"], None, None, b""
        )
        assert sleeper is not None and first.draining and not first.dead
        second = await spawners.get(LIMITS, 20)
        assert second is not first and second.usable
        assert not _gone(first.pid)  # its command still runs
        assert (await _output(sleeper))[1] == 0
        await await_until(lambda: _wait_gone(first.pid))

        async def forgotten() -> bool:
            # The OS shows the exit (a zombie) before asyncio's child watcher reaps it
            # and tells the spawner: its own view follows a moment later.
            return spawners.pids() == [second.pid]

        await await_until(forgotten, timeout=5.0)
    finally:
        await spawners.close()


# Writes its pid to the file named by argv[1], then sleeps.
MARKED = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(30)"
WORKER = f"""
import asyncio, sys
from worker_node.cmdproc import start_spawned
from worker_node.spawn import Spawner
async def main():
    spawner = Spawner({LIMITS!r}, 20)
    await spawner.start()
    await start_spawned(spawner, [sys.executable, "-c", {MARKED!r}, sys.argv[1]], None, None, b"")
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def _marked_pid(path: Path) -> bool:
    return path.exists() and path.read_text() != ""


async def test_a_spawner_whose_worker_dies_kills_its_commands(tmp_path: Path):
    marker = tmp_path / "pid"
    worker = await asyncio.create_subprocess_exec(PY, "-c", WORKER, str(marker))
    try:
        await await_until(lambda: _marked_pid(marker))
        command = int(marker.read_text())
        assert not _gone(command)
    finally:
        worker.kill()  # no chance to stop anything
        await worker.wait()
    await await_until(lambda: _wait_gone(command))


async def test_a_command_whose_caller_left_before_its_pid_came_is_killed():
    spawner = Spawner(LIMITS, 20)
    await spawner.start()
    try:
        argv = [PY, "-c", "import time; time.sleep(30)"]
        starting = asyncio.ensure_future(start_spawned(spawner, argv, None, None, b""))
        await asyncio.sleep(0)  # the request is sent; the answer is not in yet
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        # Requests are answered in order: once this one is, so was the one left behind.
        after = await start_spawned(spawner, ["true"], None, None, b"")
        assert after is not None and (await _output(after))[1] == 0
        await await_until(lambda: _no_live_children(psutil.Process(spawner.pid)))
    finally:
        spawner.close()
        await spawner.wait_closed(10)


async def _no_live_children(proc: psutil.Process) -> bool:
    return all(_gone(child.pid) for child in proc.children())


SLOW = f"""
commands:
  slow:
    argv: ["{PY}", "-c", "import os, time; os.write(1, b'up'); time.sleep(30)"]
  say: {{argv: ["echo"], allow_args: true}}
"""


async def test_when_a_spawner_dies_its_commands_fail_and_are_killed_and_the_next_one_runs():
    async with running(config(SLOW)) as (_, stub):
        stream = stub.ExecStream(pb.ExecRequest(command="slow"))
        first = await stream.read()
        assert isinstance(first, pb.ExecChunk) and first.stdout == b"up"
        listed = (await stub.ListProcesses(pb.ListProcessesRequest())).processes
        (spawner,) = [p for p in listed if p.role == "spawner"]
        (command,) = [p for p in listed if p.role == "exec"]
        assert command.ppid == spawner.pid and command.owner == "slow"
        psutil.Process(spawner.pid).kill()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "command 'slow': the command spawner" in str(err.value.details())
        assert f"its process group (pid {command.pid}) was killed" in str(err.value.details())
        await await_until(lambda: _wait_gone(command.pid))
        reply = await stub.Exec(pb.ExecRequest(command="say", args=["again"]))
        assert reply.stdout == b"again\n"
