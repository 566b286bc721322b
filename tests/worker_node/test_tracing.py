"""The worker's traces, exported over OTLP to a real receiver (tests/otlp_receiver.py).

Spans are checked after the worker has closed: closing flushes the last batch, so
everything it recorded has arrived by then and nothing waits on the export timer.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable

import grpc
import pytest

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from shoal_core.tracing import TraceSettings, parse_traceparent
from tests.otlp_receiver import (
    KIND_INTERNAL,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    OtlpReceiver,
    ReceivedSpan,
    check_tree,
    children_of,
    span_trees,
)
from tests.worker_node.conftest import await_until, config, running

PY = sys.executable
SHOW_TRACE_ENV = (
    "import os; print(os.environ.get('TRACEPARENT', '-')); print(os.environ.get('TRACESTATE', '-'))"
)
TEXT = f"""
pools:
  default: {{min: 1, max: 2, idle_timeout: 30}}
functions:
  upper: {{target: "worker_node.demo_tasks:upper"}}
  sleep: {{target: "worker_node.demo_tasks:sleep"}}
  trace_context: {{target: "tests.worker_node.tasks:trace_context"}}
commands:
  say: {{argv: ["echo"], allow_args: true}}
  trace_env: {{argv: ["{PY}", "-c", "{SHOW_TRACE_ENV}"], inherit_env: false}}
"""
SERVICE = "shoal.worker.v1.Worker"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{CALLER}-01"
STATE = "shoal=t61rcWkgMzE,other=2"
# Long enough for an export that was going to come to arrive; exports are local.
QUIET = 0.5


def settings(receiver: OtlpReceiver, sample: float = 1.0) -> TraceSettings:
    return TraceSettings(endpoint=receiver.endpoint, service="worker", sample=sample)


def headers(traceparent: str, tracestate: str = "") -> tuple[tuple[str, str], ...]:
    pairs = [("traceparent", traceparent)]
    if tracestate:
        pairs.append(("tracestate", tracestate))
    return tuple(pairs)


def traceparent_of(trace_id: str, parent: str = CALLER, flags: str = "01") -> str:
    return f"00-{trace_id}-{parent}-{flags}"


def seen(traceparent: str | None) -> tuple[str, str, bool]:
    """What a ``traceparent`` handed on says: trace id, parent span id, sampled."""
    context = parse_traceparent(traceparent or "")
    assert context is not None, f"not a traceparent: {traceparent!r}"
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", context.sampled


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def one_tree(spans: list[ReceivedSpan], trace_id: str, parent: str = CALLER) -> ReceivedSpan:
    return check_tree([s for s in spans if s.trace_id == trace_id], parent=parent)


@pytest.fixture
async def receiver():
    async with OtlpReceiver() as receiver:
        yield receiver


async def test_an_exec_is_a_server_span_under_its_caller_with_queue_and_execute_inside(receiver):
    async with running(config(TEXT), settings(receiver)) as (_, stub):
        reply = await stub.Exec(
            pb.ExecRequest(command="say", args=["hi"]), metadata=headers(SAMPLED)
        )
        assert reply.stdout == b"hi\n"
    spans = await receiver.wait_for(lambda got: len(got) >= 3, timeout=10)
    assert len(spans) == 3
    root = check_tree(spans, parent=CALLER)
    assert (root.trace_id, root.name, root.kind) == (TRACE_ID, f"{SERVICE}/Exec", KIND_SERVER)
    assert root.attributes == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "Exec",
        "rpc.grpc.status_code": 0,
    }
    assert root.status_code == STATUS_UNSET
    children = children_of(spans, root)
    (queue,), (execute,) = named(children, "worker.queue"), named(children, "worker.execute")
    assert len(children) == 2
    assert {queue.kind, execute.kind} == {KIND_INTERNAL}
    assert queue.end_ns <= execute.start_ns  # the wait ends where the execution starts
    assert queue.attributes == {"shoal.command": "say"}
    assert execute.attributes == {"shoal.command": "say", "process.exit.code": 0}
    assert {s.service for s in spans} == {"worker"}


async def test_a_command_gets_the_execute_span_as_TRACEPARENT_and_the_callers_TRACESTATE(receiver):
    streamed_id = "1" * 32
    async with running(config(TEXT), settings(receiver)) as (_, stub):
        unary = await stub.Exec(
            pb.ExecRequest(command="trace_env"), metadata=headers(SAMPLED, STATE)
        )
        chunks = [
            chunk
            async for chunk in stub.ExecStream(
                pb.ExecRequest(command="trace_env"), metadata=headers(traceparent_of(streamed_id))
            )
        ]
    spans = await receiver.wait_for(lambda got: len(got) >= 6, timeout=10)
    for trace_id, output, state in [
        (TRACE_ID, unary.stdout, STATE),
        (streamed_id, b"".join(c.stdout for c in chunks), "-"),
    ]:
        root = one_tree(spans, trace_id)
        (execute,) = named(children_of(spans, root), "worker.execute")
        # The command was started without the worker's environment; it gets these all the same.
        traceparent, tracestate = output.decode().split()
        assert seen(traceparent) == (trace_id, execute.span_id, True)
        assert tracestate == state


async def test_a_pool_function_reads_its_execute_span_through_the_accessor(receiver):
    stream_id = "2" * 32
    async with running(config(TEXT), settings(receiver)) as (_, stub):
        reply = await stub.Call(
            pb.CallRequest(function="trace_context"), metadata=headers(SAMPLED, STATE)
        )
        batch = pb.CallBatch(items=[pb.CallItem(id=i, function="trace_context") for i in range(3)])
        results = [
            result
            async for answer in stub.CallStream(
                iter([batch]), metadata=headers(traceparent_of(stream_id))
            )
            for result in answer.results
        ]
    spans = await receiver.wait_for(lambda got: len(got) >= 3 + 7, timeout=10)
    root = one_tree(spans, TRACE_ID)
    (execute,) = named(children_of(spans, root), "worker.execute")
    traceparent, tracestate = json.loads(reply.result)
    assert (seen(traceparent), tracestate) == ((TRACE_ID, execute.span_id, True), STATE)
    assert execute.attributes["shoal.function"] == "trace_context"
    assert execute.attributes["process.pid"] == reply.pid
    stream = one_tree(spans, stream_id)
    executes = {s.span_id for s in named(children_of(spans, stream), "worker.execute")}
    parents = {seen(json.loads(r.result)[0]) for r in results}
    assert parents == {(stream_id, span_id, True) for span_id in executes}
    assert len(parents) == 3


async def test_a_function_sees_no_trace_context_when_the_worker_does_not_trace(worker):
    _, stub = worker
    reply = await stub.Call(pb.CallRequest(function="trace_context"), metadata=headers(SAMPLED))
    assert json.loads(reply.result) == [None, None]


async def test_every_method_records_a_server_span_and_its_work_inside(receiver):
    cases = {  # trace id: (method, names of the root's children)
        "a" * 32: ("Echo", []),
        "b" * 32: ("Stats", []),
        "c" * 32: ("Call", ["worker.queue", "worker.execute"]),
        "d" * 32: ("ExecStream", ["worker.queue", "worker.execute"]),
        "e" * 32: ("CallStream", ["worker.queue", "worker.execute"] * 4),
    }
    ids = iter(cases)
    async with running(config(TEXT), settings(receiver)) as (_, stub):
        await stub.Echo(pb.EchoRequest(payload=b"x"), metadata=headers(traceparent_of(next(ids))))
        await stub.Stats(pb.StatsRequest(), metadata=headers(traceparent_of(next(ids))))
        await stub.Call(
            pb.CallRequest(function="upper", payload=b"x"),
            metadata=headers(traceparent_of(next(ids))),
        )
        async for _ in stub.ExecStream(
            pb.ExecRequest(command="say", args=["x"]), metadata=headers(traceparent_of(next(ids)))
        ):
            pass
        # More sleeps than processes: some wait in the pool's queue.
        items = [pb.CallItem(id=i, function="sleep", payload=b"0.2") for i in range(4)]
        async for _ in stub.CallStream(
            iter([pb.CallBatch(items=items)]), metadata=headers(traceparent_of(next(ids)))
        ):
            pass
    spans = await receiver.wait_for(lambda got: len(got) >= 2 + 3 + 3 + 9, timeout=10)
    assert set(span_trees(spans)) == set(cases)
    for trace_id, (method, children) in cases.items():
        root = one_tree(spans, trace_id)
        assert (root.name, root.attributes["rpc.grpc.status_code"]) == (f"{SERVICE}/{method}", 0)
        assert sorted(s.name for s in children_of(spans, root)) == sorted(children)


async def test_a_failed_call_has_its_status_and_an_error_on_its_span(receiver):
    async with running(config(TEXT), settings(receiver)) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Exec(pb.ExecRequest(command="rm"), metadata=headers(SAMPLED))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    (span,) = await receiver.wait_for(lambda got: len(got) >= 1, timeout=10)
    assert check_tree([span], parent=CALLER) == span
    assert (span.status_code, span.attributes["rpc.grpc.status_code"]) == (STATUS_ERROR, 5)


async def test_a_call_that_ends_before_its_work_ends_that_work_with_it(receiver):
    async with running(config(TEXT), settings(receiver)) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Call(
                pb.CallRequest(function="sleep", payload=b"3"),
                metadata=headers(SAMPLED),
                timeout=0.3,
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    spans = await receiver.wait_for(lambda got: len(got) >= 3, timeout=10)
    root = check_tree(spans, parent=CALLER)
    assert root.status_code == STATUS_ERROR
    (execute,) = named(spans, "worker.execute")
    assert execute.status_code == STATUS_ERROR


async def test_refused_work_ends_as_an_error_inside_its_call(receiver):
    text = TEXT.replace("{min: 1, max: 2, idle_timeout: 30}", "{min: 1, max: 1, queue: 1}")
    text += f"""
  nap: {{argv: ["{PY}", "-c", "import time; time.sleep(1)"]}}
exec: {{max_concurrent: 1, queue: 0}}
"""
    pool_refused, exec_refused = "3" * 32, "4" * 32
    async with running(config(text), settings(receiver)) as (_, stub):
        nap = pb.CallRequest(function="sleep", payload=b"0.5")
        # Two calls (one runs, one waits: the queue is full) and a command fill the worker.
        busy = asyncio.gather(
            stub.Call(nap), stub.Call(nap), stub.Exec(pb.ExecRequest(command="nap"))
        )
        await await_until(lambda: _full(stub))
        pool_call = pb.CallRequest(function="upper")
        exec_call = pb.ExecRequest(command="say")
        refused: list[Awaitable[object]] = [
            stub.Call(pool_call, metadata=headers(traceparent_of(pool_refused))),
            stub.Exec(exec_call, metadata=headers(traceparent_of(exec_refused))),
        ]
        for call in refused:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await busy
    spans = await receiver.wait_for(lambda got: len(got) >= 4, timeout=10)
    for trace_id in (pool_refused, exec_refused):
        root = one_tree(spans, trace_id)
        (queue,) = children_of(spans, root)
        assert queue.name == "worker.queue"
        assert (root.status_code, queue.status_code) == (STATUS_ERROR, STATUS_ERROR)


async def _full(stub) -> bool:
    reply = await stub.Stats(pb.StatsRequest())
    return bool(reply.tasks_queued == 1 and reply.exec_running == 1)


async def test_a_call_without_traceparent_starts_a_trace_when_sampled(receiver):
    async with running(config(TEXT), settings(receiver, sample=1.0)) as (_, stub):
        reply = await stub.Exec(pb.ExecRequest(command="trace_env"))
    spans = await receiver.wait_for(lambda got: len(got) >= 3, timeout=10)
    root = check_tree(spans, parent="")
    (execute,) = named(spans, "worker.execute")
    traceparent, tracestate = reply.stdout.decode().split()
    assert (seen(traceparent), tracestate) == ((root.trace_id, execute.span_id, True), "-")


async def test_with_sample_zero_a_call_without_traceparent_exports_nothing(receiver):
    async with running(config(TEXT), settings(receiver, sample=0.0)) as (_, stub):
        reply = await stub.Exec(pb.ExecRequest(command="trace_env"))
        await stub.Call(pb.CallRequest(function="upper", payload=b"x"))
        await stub.Echo(pb.EchoRequest(payload=b"x"))
    await asyncio.sleep(QUIET)
    assert receiver.spans == []
    # The trace was started, unsampled, and handed on so: what the command records follows.
    _, _, sampled = seen(reply.stdout.decode().split()[0])
    assert not sampled


async def test_a_call_whose_caller_did_not_sample_exports_nothing(receiver):
    unsampled = traceparent_of(TRACE_ID, flags="00")
    async with running(config(TEXT), settings(receiver, sample=1.0)) as (_, stub):
        reply = await stub.Exec(pb.ExecRequest(command="trace_env"), metadata=headers(unsampled))
        await stub.Call(pb.CallRequest(function="upper", payload=b"x"), metadata=headers(unsampled))
    await asyncio.sleep(QUIET)
    assert receiver.spans == []
    trace_id, _, sampled = seen(reply.stdout.decode().split()[0])
    assert (trace_id, sampled) == (TRACE_ID, False)


NO_OPENTELEMETRY = f"""
import asyncio, sys
import grpc
from protos import worker_pb2 as pb, worker_pb2_grpc as pb_grpc
from shoal_cli.worker_cmd import worker
from worker_node.server import WorkerServer
from tests.worker_node.conftest import config

async def main():
    async with WorkerServer("127.0.0.1:0", config({TEXT!r})) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            md = (("traceparent", {SAMPLED!r}),)
            await stub.Echo(pb.EchoRequest(payload=b"x"), metadata=md)
            await stub.Call(pb.CallRequest(function="trace_context"), metadata=md)
            await stub.Exec(pb.ExecRequest(command="say", args=["x"]), metadata=md)

asyncio.run(main())
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_a_worker_that_does_not_trace_never_imports_opentelemetry():
    done = subprocess.run(
        [PY, "-c", NO_OPENTELEMETRY], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


SHOAL = [PY, "-c", "import sys; from shoal_cli.main import main; sys.exit(main())"]


async def test_shoal_worker_exports_spans_to_the_endpoint_it_is_given(receiver):
    proc = await asyncio.create_subprocess_exec(
        *SHOAL,
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--config",
        "examples/worker.yaml",
        "--otlp-endpoint",
        receiver.endpoint,
        "--trace-sample",
        "1",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("shoal worker serving on "), line
        async with grpc.aio.insecure_channel(line.split()[-1]) as channel:
            stub = pb_grpc.WorkerStub(channel)
            await stub.Call(
                pb.CallRequest(function="upper", payload=b"x"), metadata=headers(SAMPLED)
            )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    spans = await receiver.wait_for(lambda got: len(got) >= 3, timeout=10)
    root = check_tree(spans, parent=CALLER)
    assert (root.name, root.service) == (f"{SERVICE}/Call", "worker")
