"""Limits on pool processes (rlimits, a per-task CPU budget) and the psutil watchdog."""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import subprocess
import sys
from typing import Any

import grpc
import pytest

from protos import worker_pb2 as pb
from tests.worker_node.conftest import config, running, stats
from worker_node import limits as limits_module
from worker_node.limits import MIB, LimitSpec, TaskCpu, Watchdog, rlimit_argv
from worker_node.procs import kill_tree


async def test_the_watchdog_kills_a_tree_over_its_memory_limit():
    hog = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; b = bytearray(200 * 1024 * 1024); time.sleep(30)"
    )
    reasons: list[str] = []

    def exceeded(why: str) -> None:
        reasons.append(why)
        kill_tree(hog.pid)

    watchdog = Watchdog(hog.pid, LimitSpec(memory_bytes=64 * MIB), exceeded, interval=0.05)
    watchdog.start()
    try:
        code = await asyncio.wait_for(hog.wait(), 20)
    finally:
        watchdog.stop()
        if hog.returncode is None:
            hog.kill()
            await hog.wait()
    assert code == -9
    assert reasons and "over its limit of 64 MiB" in reasons[0]


CPUS = os.cpu_count() or 1
POOLS = """
pools:
  default: {min: 1, max: 1}
  tight: {min: 1, max: 1, limits: {cpu_seconds: 1, max_memory_mb: 256, open_files: 64}}
  lifted:
    min: 1
    max: 1
    limits: {cpu_seconds: unlimited, max_memory_mb: unlimited, open_files: unlimited}
functions:
  limits: {target: "tests.worker_node.tasks:limits", timeout: 2.5}
  reserve: {target: "tests.worker_node.tasks:reserve"}
  tight_limits: {target: "tests.worker_node.tasks:limits", pool: tight}
  spin: {target: "tests.worker_node.tasks:spin", pool: tight, timeout: 60}
  burn: {target: "tests.worker_node.tasks:burn", pool: tight, timeout: 60}
  lifted_limits: {target: "tests.worker_node.tasks:limits", pool: lifted}
"""


async def _limits_in(stub, function: str) -> Any:
    reply = await stub.Call(pb.CallRequest(function=function))
    return json.loads(reply.result)


def _inherited(name: str) -> list[int | None]:
    soft, hard = resource.getrlimit(getattr(resource, "RLIMIT_" + name))
    return [None if v == resource.RLIM_INFINITY else v for v in (soft, hard)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rlimits as Linux has them")
async def test_pool_processes_get_default_limits_an_entry_can_change_or_lift():
    async with running(config(POOLS)) as (_, stub):
        got = await _limits_in(stub, "limits")
        assert got["AS"] == [4096 * MIB] * 2
        assert got["NOFILE"] == [1024, 1024]
        # CPU is a per-task budget: the function's timeout times the CPUs, from the task's start.
        budget = math.ceil(2.5 * CPUS)
        assert got["CPU"][1] == _inherited("CPU")[1]
        assert got["CPU"][0] is not None and budget <= got["CPU"][0] <= budget + 1
        # Address space for big imports: 2 GiB maps fine under the default, 5 GiB does not.
        assert (await stub.Call(pb.CallRequest(function="reserve", payload=b"2048"))).result
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Call(pb.CallRequest(function="reserve", payload=b"5120"))
        assert "Cannot allocate memory" in str(err.value.details())
        tight = await _limits_in(stub, "tight_limits")
        assert (tight["AS"], tight["NOFILE"]) == ([256 * MIB] * 2, [64, 64])
        assert tight["CPU"][0] is not None and 1 <= tight["CPU"][0] <= 2
        lifted = await _limits_in(stub, "lifted_limits")
        assert lifted["AS"] == _inherited("AS") and lifted["NOFILE"] == _inherited("NOFILE")
        assert lifted["CPU"] == _inherited("CPU")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rlimits as Linux has them")
async def test_the_cpu_limit_stops_a_runaway_task_but_not_a_process_of_many_short_ones():
    async with running(config(POOLS)) as (server, stub):
        # 8 tasks of 0.2 s CPU each: 1.6 s in all, past a lifetime limit of 1 s.
        pids = {(await stub.Call(pb.CallRequest(function="burn", payload=b"0.2"))).pid}
        for _ in range(7):
            pids.add((await stub.Call(pb.CallRequest(function="burn", payload=b"0.2"))).pid)
        assert len(pids) == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Call(pb.CallRequest(function="spin"))
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "killed by SIGXCPU (over its CPU time limit)" in str(err.value.details())
        tight = next(s for s in (await stats(stub)).pools if s.name == "tight")
        assert (tight.processes_died, tight.tasks_done) == (1, 8)


def test_task_cpu_counts_from_when_each_task_reaches_the_head():
    cpu = TaskCpu()
    first, second = object(), object()
    assert cpu.used(None, 5.0) is None
    assert cpu.used(first, 5.0) == 0.0
    assert cpu.used(first, 6.5) == 1.5
    assert cpu.used(second, 7.0) == 0.0  # the next task starts from here
    assert cpu.used(second, 7.25) == 0.25
    assert cpu.used(None, 9.0) is None
    assert cpu.used(second, 9.5) == 0.0  # idle in between: counted afresh


async def test_the_watchdog_keeps_a_cpu_budget_per_task_where_rlimits_do_not():
    spinner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    head = [object()]
    reasons: list[str] = []

    def exceeded(why: str) -> None:
        reasons.append(why)
        kill_tree(spinner.pid)

    watchdog = Watchdog(
        spinner.pid, LimitSpec(), exceeded, interval=0.05, task_budget=lambda: (head[0], 1)
    )
    watchdog.start()
    try:
        # A new task every 0.25 s: up to 2 s of CPU in all, never 1 s in one task.
        for _ in range(8):
            await asyncio.sleep(0.25)
            head[0] = object()
        assert spinner.returncode is None and not reasons
        code = await asyncio.wait_for(spinner.wait(), 30)  # now one task runs on
    finally:
        watchdog.stop()
        if spinner.returncode is None:
            spinner.kill()
            await spinner.wait()
    assert code == -9
    assert reasons and "the task's CPU time" in reasons[0] and "limit of 1s" in reasons[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rlimits as Linux has them")
@pytest.mark.parametrize("prlimit", [True, False], ids=["prlimit", "python"])
def test_both_trampolines_set_the_limits_before_the_command_runs(monkeypatch, prlimit):
    if not prlimit:
        monkeypatch.setattr(limits_module, "_PRLIMIT", None)
    elif limits_module._PRLIMIT is None:
        pytest.skip("no util-linux prlimit here")
    show = (
        "import json, resource; print(json.dumps([resource.getrlimit(getattr(resource, "
        "'RLIMIT_' + n)) for n in ('AS', 'CPU', 'NOFILE')]))"
    )
    spec = LimitSpec(memory_bytes=512 * MIB, cpu_seconds=9, open_files=77)
    argv = rlimit_argv(spec, [sys.executable, "-c", show])
    assert (argv[0] == limits_module._PRLIMIT) == prlimit
    out = subprocess.run(argv, capture_output=True, check=True).stdout
    assert json.loads(out) == [[512 * MIB] * 2, [9, 10], [77, 77]]
