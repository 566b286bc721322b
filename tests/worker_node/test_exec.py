"""Exec and ExecStream through a real worker server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import sys
from typing import Any

import grpc
import pytest

from protos import worker_pb2 as pb
from tests.worker_node.conftest import config, running
from worker_node.limits import MIB

PY = sys.executable
SHOW_LIMITS = (
    "import json, resource; "
    "print(json.dumps({n: resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) "
    "for n in ('AS', 'CPU', 'NOFILE')}))"
)
# 10 MB of output: 100 runs of 100,000 equal letters, A to Z and round again.
FLOOD = "import sys; [sys.stdout.buffer.write(bytes([65 + i % 26]) * 100_000) for i in range(100)]"
TEXT = f"""
exec: {{max_output_bytes: 1048576}}
functions:
  upper: {{target: "worker_node.demo_tasks:upper"}}
commands:
  say: {{argv: ["echo"], allow_args: true, cacheable: true}}
  fixed: {{argv: ["echo", "fixed"]}}
  cat: {{argv: ["cat"]}}
  env: {{argv: ["env"], inherit_env: false, env: {{A: one}}, allow_env: [B]}}
  ghost: {{argv: ["no-such-program-shoal"]}}
  slow:
    argv: ["{PY}", "-u", "-c", "import time; print('started', flush=True); time.sleep(30)"]
    timeout: 1
  flaky:
    argv: ["{PY}", "-c", "import sys; sys.exit(3)"]
    restart: on-failure
    max_restarts: 2
  spin:
    argv: ["{PY}", "-c", "while True: pass"]
    limits: {{cpu_seconds: 1}}
  limits: {{argv: ["{PY}", "-c", "{SHOW_LIMITS}"], timeout: 2.5}}
  flood: {{argv: ["{PY}", "-c", "{FLOOD}"]}}
  small:  # too small for a spawner to run under: set by the trampoline
    argv: ["{PY}", "-c", "{SHOW_LIMITS}"]
    limits: {{max_memory_mb: 128, cpu_seconds: 3, open_files: 32}}
  lifted:
    argv: ["{PY}", "-c", "{SHOW_LIMITS}"]
    limits: {{max_memory_mb: unlimited, cpu_seconds: 7, open_files: unlimited}}
"""


@pytest.fixture
async def execs():
    async with running(config(TEXT)) as pair:
        yield pair[1]


async def test_exec_runs_argv_with_args_and_stdin(execs):
    reply = await execs.Exec(pb.ExecRequest(command="say", args=["hello", "$HOME;", "|x"]))
    assert (reply.exit_code, reply.stdout, reply.attempts) == (0, b"hello $HOME; |x\n", 1)
    assert reply.pid > 0 and reply.duration_seconds > 0
    cat = await execs.Exec(pb.ExecRequest(command="cat", stdin=b"piped in"))
    assert cat.stdout == b"piped in"
    env = await execs.Exec(pb.ExecRequest(command="env", env={"B": "two"}))
    assert sorted(env.stdout.decode().split()) == ["A=one", "B=two"]


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (pb.ExecRequest(command="rm"), grpc.StatusCode.NOT_FOUND, "'rm' is not in"),
        (pb.ExecRequest(command="fixed", args=["x"]), grpc.StatusCode.PERMISSION_DENIED, "args"),
        (
            pb.ExecRequest(command="env", env={"PATH": "/"}),
            grpc.StatusCode.PERMISSION_DENIED,
            "PATH",
        ),
        (pb.ExecRequest(command="cat", cwd="/tmp"), grpc.StatusCode.PERMISSION_DENIED, "cwd"),
        (
            pb.ExecRequest(command="ghost"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'no-such-program-shoal'",
        ),
    ],
)
async def test_exec_refusals_are_clear(execs, request_, code, text):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execs.Exec(request_)
    assert err.value.code() == code
    assert text in str(err.value.details())


async def test_exec_timeout_gives_partial_output_and_kills_the_group(execs):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await execs.Exec(pb.ExecRequest(command="slow"))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "ran past its timeout of 1s" in str(err.value.details())
    trailers: dict[str, Any] = dict(err.value.trailing_metadata() or ())  # type: ignore[arg-type]
    assert trailers["shoal-partial-stdout-bin"] == b"started\n"


async def test_exec_stream_sends_chunks_then_status(execs):
    chunks = [c async for c in execs.ExecStream(pb.ExecRequest(command="say", args=["hi"]))]
    assert chunks[0].stdout == b"hi\n"
    assert chunks[-1].WhichOneof("kind") == "exit" and chunks[-1].exit.exit_code == 0
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in execs.ExecStream(pb.ExecRequest(command="slow")):
            got.append(chunk)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert b"".join(c.stdout for c in got) == b"started\n"


async def test_big_output_is_streamed_in_order_and_capped_in_a_unary_reply(execs):
    expected = b"".join(bytes([65 + i % 26]) * 100_000 for i in range(100))
    got = bytearray()
    async for chunk in execs.ExecStream(pb.ExecRequest(command="flood")):
        got += chunk.stdout
        await asyncio.sleep(0.001)  # a slow reader: the command is held back, not buffered
    assert got == expected
    reply = await execs.Exec(pb.ExecRequest(command="flood"))
    assert reply.truncated and reply.exit_code == 0
    assert reply.stdout == expected[: 1024 * 1024]


async def test_restart_policy_reruns_a_failing_command(execs):
    reply = await execs.Exec(pb.ExecRequest(command="flaky"))
    assert (reply.exit_code, reply.attempts) == (3, 3)


async def test_cpu_rlimit_ends_a_runaway_command(execs):
    reply = await execs.Exec(pb.ExecRequest(command="spin", timeout_ms=20_000))
    assert reply.exit_code in (-24, -9)  # SIGXCPU at the soft limit, SIGKILL at the hard one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rlimits as Linux has them")
async def test_commands_get_default_limits_an_entry_can_change_or_lift(execs):
    got = json.loads((await execs.Exec(pb.ExecRequest(command="limits"))).stdout)
    cpu = math.ceil(2.5 * (os.cpu_count() or 1))  # the timeout times the CPUs
    assert got == {"AS": [4096 * MIB] * 2, "CPU": [cpu, cpu + 1], "NOFILE": [1024, 1024]}
    small = json.loads((await execs.Exec(pb.ExecRequest(command="small"))).stdout)
    assert small == {"AS": [128 * MIB] * 2, "CPU": [3, 4], "NOFILE": [32, 32]}
    lifted = json.loads((await execs.Exec(pb.ExecRequest(command="lifted"))).stdout)
    assert lifted == {
        "AS": list(resource.getrlimit(resource.RLIMIT_AS)),
        "CPU": [7, 8],
        "NOFILE": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


async def test_cacheable_exec_says_hit_in_trailing_metadata(execs):
    first = execs.Exec(pb.ExecRequest(command="say", args=["cached"]))
    assert (await first).stdout == b"cached\n"
    assert dict(await first.trailing_metadata())["shoal-cache"] == "miss"
    second = execs.Exec(pb.ExecRequest(command="say", args=["cached"]))
    assert (await second).pid == (await first).pid
    assert dict(await second.trailing_metadata())["shoal-cache"] == "hit"


async def test_a_vanishing_client_kills_its_command(execs):
    call = execs.ExecStream(pb.ExecRequest(command="slow"))
    async for _ in call:
        break
    call.cancel()
    reply = await execs.Exec(pb.ExecRequest(command="say", args=["still here"]))
    assert reply.stdout == b"still here\n"
