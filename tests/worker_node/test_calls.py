"""Call, CallStream, Echo, Stats and processes through a real worker server."""

from __future__ import annotations

import asyncio

import grpc
import psutil
import pytest

from protos import worker_pb2 as pb
from tests.worker_node.conftest import BASE, await_until, config, pool_stats, running, stats

Code = grpc.StatusCode


async def test_echo_returns_the_same_bytes(worker):
    _, stub = worker
    payload = bytes(range(256)) * 10
    reply = await stub.Echo(pb.EchoRequest(payload=payload))
    assert reply.payload == payload
    assert (await stats(stub)).echo_total == 1


async def test_call_runs_in_a_warm_pool_process(worker):
    server, stub = worker
    reply = await stub.Call(pb.CallRequest(function="upper", payload=b"shoal"))
    assert reply.result == b"SHOAL"
    assert reply.pid in {p.pid for p in server.pools["default"].processes()}
    me = await stub.Call(pb.CallRequest(function="pid"))
    assert int(me.result) == me.pid


@pytest.mark.parametrize(
    ("function", "payload", "code", "text"),
    [
        ("nope", b"", Code.NOT_FOUND, "'nope' is not in this worker's allowlist"),
        ("sleep", b"soon", Code.UNKNOWN, "ValueError"),
        ("wrong_type", b"", Code.UNKNOWN, "returned int, expected bytes"),
        ("big", b"5000000", Code.RESOURCE_EXHAUSTED, "limit is"),
    ],
)
async def test_call_errors_are_clear(worker, function, payload, code, text):
    _, stub = worker
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Call(pb.CallRequest(function=function, payload=payload))
    assert err.value.code() == code
    assert text in str(err.value.details())
    assert (await stub.Call(pb.CallRequest(function="upper", payload=b"ok"))).result == b"OK"


async def test_oversize_payload_and_garbage_bytes_are_refused(worker):
    server, stub = worker
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Call(pb.CallRequest(function="upper", payload=b"x" * (4 * 1024 * 1024 + 1)))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "payload is 4194305 bytes; the limit is 4194304" in str(err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Echo(pb.EchoRequest(payload=b"x" * (9 * 1024 * 1024)))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    async with grpc.aio.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/shoal.worker.v1.Worker/Call", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\xff\xfe garbage \x00\x01")
        # shoal_core's strict decoding answers garbage with a clear INVALID_ARGUMENT.
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "could not be decoded" in str(err.value.details())
    assert (await stub.Echo(pb.EchoRequest(payload=b"alive"))).payload == b"alive"


async def test_timeout_kills_the_process_group(worker, tmp_path):
    _, stub = worker
    marker = tmp_path / "grandchild.pid"
    before = await pool_stats(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Call(
            pb.CallRequest(function="hang", payload=str(marker).encode(), timeout_ms=1500)
        )
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    assert "ran past its timeout of 1.5s" in str(err.value.details())
    grandchild = int(marker.read_text())
    await await_until(lambda: _gone(grandchild))
    await await_until(lambda: _size_is(stub, before.size))


async def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _size_is(stub, size: int) -> bool:
    return (await pool_stats(stub)).size == size


async def test_a_crash_fails_the_task_and_the_process_is_replaced(worker):
    _, stub = worker
    first = await stub.Call(pb.CallRequest(function="pid"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Call(pb.CallRequest(function="crash", payload=b"7"))
    assert err.value.code() == Code.ABORTED
    assert "died while running 'crash' (exit code 7)" in str(err.value.details())
    await await_until(lambda: _size_is(stub, 1))
    after = await stub.Call(pb.CallRequest(function="pid"))
    assert after.pid != first.pid
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == "zombie"
    s = await pool_stats(stub)
    assert (s.processes_died, s.processes_restarted) == (1, 1)


# (policy, function that ends the process, replaced?)
RESTART_CASES = [
    ("never", "crash", False),
    ("on-failure", "crash", True),
    ("on-failure", "exit_clean", False),
    ("on-failure", "terminate_self", False),
    ("unless-stopped", "exit_clean", True),
    ("unless-stopped", "terminate_self", False),
    ("always", "terminate_self", True),
    ("always", "exit_clean", True),
]


@pytest.mark.parametrize(("policy", "ender", "replaced"), RESTART_CASES)
async def test_restart_policies(policy, ender, replaced):
    text = BASE.replace(
        "default: {min: 1, max: 2, idle_timeout: 30}",
        f"default: {{min: 2, max: 2, restart: {policy}}}",
    )
    async with running(config(text)) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Call(pb.CallRequest(function=ender))
        await await_until(lambda: _settled(stub))
        s = await pool_stats(stub)
        assert s.processes_died == 1
        assert s.size == (2 if replaced else 1)
        assert s.processes_restarted == int(replaced)
        assert (await stub.Call(pb.CallRequest(function="upper", payload=b"a"))).result == b"A"


async def _settled(stub) -> bool:
    s = await pool_stats(stub)
    return s.processes_died == 1 and s.starting == 0


async def test_a_full_queue_answers_resource_exhausted_at_once():
    text = BASE.replace(
        "default: {min: 1, max: 2, idle_timeout: 30}", "default: {min: 1, max: 1, queue: 2}"
    )
    async with running(config(text)) as (_, stub):
        calls = [
            asyncio.ensure_future(stub.Call(pb.CallRequest(function="sleep", payload=b"1")))
            for _ in range(3)
        ]
        await await_until(lambda: _queued(stub, 2))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Call(pb.CallRequest(function="upper", payload=b"x"))
        assert err.value.code() == Code.RESOURCE_EXHAUSTED
        assert "2 tasks queued (limit 2)" in str(err.value.details())
        replies = await asyncio.gather(*calls)
        assert [r.result for r in replies] == [b"1"] * 3
        assert (await pool_stats(stub)).rejected == 1


async def _queued(stub, n: int) -> bool:
    return (await pool_stats(stub)).queued == n


async def test_the_pool_scales_up_under_load_and_down_when_idle():
    text = BASE.replace(
        "default: {min: 1, max: 2, idle_timeout: 30}",
        "default: {min: 1, max: 3, idle_timeout: 0.5, scale_up_at: 0.5}",
    )
    async with running(config(text)) as (_, stub):
        calls = [
            asyncio.ensure_future(stub.Call(pb.CallRequest(function="sleep", payload=b"1.5")))
            for _ in range(4)
        ]
        await await_until(lambda: _size_at_least(stub, 3))
        pids = {r.pid for r in await asyncio.gather(*calls)}
        assert len(pids) >= 2
        s = await pool_stats(stub)
        assert s.size <= 3
        await await_until(lambda: _size_is(stub, 1))


async def _size_at_least(stub, n: int) -> bool:
    return (await pool_stats(stub)).size >= n


async def test_call_stream_runs_batches_and_reports_each_item(worker):
    _, stub = worker

    async def batches():
        for start in range(0, 600, 200):
            yield pb.CallBatch(
                items=[
                    pb.CallItem(id=i, function="upper", payload=str(i).encode() + b"a")
                    for i in range(start, start + 200)
                ]
            )
        yield pb.CallBatch(items=[pb.CallItem(id=1000, function="missing")])

    results = {}
    async for message in stub.CallStream(batches()):
        for r in message.results:
            results[r.id] = r
    assert len(results) == 601
    assert all(results[i].result == f"{i}A".encode() and results[i].code == 0 for i in range(600))
    assert results[1000].code == Code.NOT_FOUND.value[0]
    assert "'missing'" in results[1000].message


async def test_clients_that_vanish_mid_call_lose_nothing(worker):
    """Nothing another client has, nothing the pool has: no process, task or result."""
    server, stub = worker
    pids = {p.pid for p in server.pools["default"].processes()}
    before = await pool_stats(stub)
    bystander = asyncio.ensure_future(
        stub.Call(pb.CallRequest(function="slow_upper", payload=b"bystander"))
    )
    call = stub.Call(pb.CallRequest(function="sleep", payload=b"0.5"))
    await asyncio.sleep(0.1)
    call.cancel()

    async def endless():
        i = 0
        while True:
            yield pb.CallBatch(items=[pb.CallItem(id=i, function="noop")])
            i += 1
            await asyncio.sleep(0.001)

    stream = stub.CallStream(endless())
    async for _ in stream:
        break
    stream.cancel()
    # Another client's call, running meanwhile, gets its answer.
    assert (await bystander).result == b"BYSTANDER"
    await await_until(lambda: _idle(stub))
    after = await pool_stats(stub)
    # No pool process was killed or died for it, and every task that started finished:
    # the abandoned sleep, the bystander and the stream's first item at least.
    assert after.processes_died == 0
    assert pids <= {p.pid for p in server.pools["default"].processes()}
    assert after.tasks_failed == before.tasks_failed
    assert after.tasks_done >= before.tasks_done + 3
    assert (await stub.Call(pb.CallRequest(function="upper", payload=b"b"))).result == b"B"


async def _idle(stub) -> bool:
    s = await stats(stub)
    return s.tasks_running == 0 and s.tasks_queued == 0


async def test_stats_and_processes(worker):
    server, stub = worker
    await stub.Call(pb.CallRequest(function="upper", payload=b"x"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Call(pb.CallRequest(function="nope"))
    s = await stats(stub)
    call = next(m for m in s.methods if m.method == "Call")
    assert (call.total, call.ok, call.failed) == (2, 1, 1)
    assert 0 < call.p50_ms <= call.p90_ms <= call.p99_ms
    assert s.uptime_seconds > 0
    listed = (await stub.ListProcesses(pb.ListProcessesRequest())).processes
    pool = [p for p in listed if p.role == "pool"]
    assert {p.pid for p in pool} == {p.pid for p in server.pools["default"].processes()}
    assert all(p.ppid == psutil.Process().pid and p.rss_bytes > 0 for p in pool)
    assert any("worker_node.child" in " ".join(p.cmdline) for p in pool)
    one = await stub.GetProcess(pb.GetProcessRequest(pid=pool[0].pid))
    assert one.state in ("idle", "busy") and one.owner == "default"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetProcess(pb.GetProcessRequest(pid=1))
    assert err.value.code() == Code.NOT_FOUND


async def test_drain_lets_in_flight_calls_finish_then_stops_everything():
    async with running(config()) as (server, stub):
        pids = [p.pid for p in server.pools["default"].processes()]
        call = asyncio.ensure_future(stub.Call(pb.CallRequest(function="sleep", payload=b"1")))
        await await_until(lambda: _running(stub))
        closing = asyncio.ensure_future(server.close(grace=10))
        reply = await call
        assert reply.result == b"1"
        await closing
        assert all(not psutil.pid_exists(pid) for pid in pids)


async def _running(stub) -> bool:
    return (await stats(stub)).tasks_running == 1
