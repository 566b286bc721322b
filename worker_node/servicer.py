"""The Worker gRPC service: wire messages in, domain calls, wire messages out.

Domain errors become status codes here and only here. When the worker traces,
each call's metadata goes to ``tracing`` at its start and its status at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc
from shoal_core.codes import ErrorCodes
from shoal_core.servicing import maps_errors
from worker_node import errors
from worker_node.cache import ResponseCache
from worker_node.config import WorkerConfig
from worker_node.execs import ExecResult, ExecRunner, Output, Prepared
from worker_node.gate import Gate
from worker_node.pool import Pool
from worker_node.poolproc import TaskOutcome
from worker_node.procs import CpuSampler
from worker_node.protocol import Status
from worker_node.stats import WorkerStats
from worker_node.streams import run_call_stream
from worker_node.wire import list_processes, stats_reply

if TYPE_CHECKING:
    from worker_node.tracing import CallTrace, WorkerTracer

__all__ = ["CODES", "WorkerServicer"]

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
CODES = ErrorCodes[grpc.StatusCode](
    {
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
        errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
        errors.TaskError: grpc.StatusCode.UNKNOWN,
        errors.TaskTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.ProcessDied: grpc.StatusCode.ABORTED,
        errors.MissingExecutable: grpc.StatusCode.FAILED_PRECONDITION,
        errors.ResultTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    },
    default=grpc.StatusCode.FAILED_PRECONDITION,
)
# Partial output of a timed-out Exec travels in trailing metadata, which peers cap at ~8 KiB.
PARTIAL_TAIL = 2048

Resp = TypeVar("Resp")
H = TypeVar("H", bound=Callable[..., Any])


def _partial_output(exc: BaseException) -> Sequence[tuple[str, str | bytes]]:
    if not isinstance(exc, errors.TaskTimeout):
        return ()
    return (
        ("shoal-partial-stdout-bin", exc.stdout[-PARTIAL_TAIL:]),
        ("shoal-partial-stderr-bin", exc.stderr[-PARTIAL_TAIL:]),
    )


# Unary replies carry a timed-out command's partial output; a stream has sent it already.
_mapped = maps_errors(errors.WorkerError, CODES, trailers=_partial_output)
_mapped_stream = maps_errors(errors.WorkerError, CODES)
# The traced call being served: grpc runs each call in a task (so a context) of its own.
_CALL: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar("call", default=None)


def _status_code(exc: BaseException | None, context: Context) -> int:
    """The number of the status a call ends with, as the client sees it."""
    if exc is None:
        code = grpc.StatusCode.OK
    elif isinstance(exc, grpc.aio.AbortError):
        code = context.code()
    elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
        code = grpc.StatusCode.CANCELLED
    else:
        code = grpc.StatusCode.UNKNOWN
    return int(code.value[0])


class _Recorded:
    """``with`` around one call: its time and outcome in the stats; its span if traced."""

    __slots__ = ("_context", "_method", "_servicer", "_started", "_trace")

    def __init__(self, servicer: WorkerServicer, method: str, context: Context) -> None:
        self._servicer = servicer
        self._method = method
        self._context = context
        self._trace: CallTrace | None = None
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()
        tracer = self._servicer.tracer
        if tracer is not None:
            self._trace = tracer.call(self._method, self._context.invocation_metadata())
            _CALL.set(self._trace)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._started
        self._servicer.stats.record(self._method, elapsed, exc is None)
        if self._trace is not None:
            self._trace.end(_status_code(exc, self._context))


def _tracked(method: str) -> Callable[[H], H]:
    """Record each call of a servicer method (unary or streaming): stats, and span."""

    def wrap(handler: H) -> H:
        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def stream(self: WorkerServicer, request: Any, context: Context) -> Any:
                with _Recorded(self, method, context):
                    async for item in handler(self, request, context):
                        yield item

            return cast(H, stream)

        @functools.wraps(handler)
        async def unary(self: WorkerServicer, request: Any, context: Context) -> Any:
            with _Recorded(self, method, context):
                return await handler(self, request, context)

        return cast(H, unary)

    return wrap


def outcome_reply(function: str, outcome: TaskOutcome) -> pb.CallReply:
    """A pool outcome as a reply, or the error it stands for."""
    if outcome.status is Status.OK:
        return pb.CallReply(result=outcome.body, pid=outcome.pid, run_seconds=outcome.seconds)
    text = outcome.body.decode(errors="replace")
    if outcome.status is Status.TOO_LARGE:
        raise errors.ResultTooLarge(f"function {function!r}: {text}")
    raise errors.TaskError(f"function {function!r} failed: {text}")


class WorkerServicer(pb_grpc.WorkerServicer):
    """Maps Worker RPCs onto the pools, the command runner and the cache."""

    def __init__(
        self,
        config: WorkerConfig,
        pools: Mapping[str, Pool],
        runner: ExecRunner,
        cache: ResponseCache[Any],
        stats: WorkerStats,
    ) -> None:
        self.config = config
        self.stats = stats
        self._pools = dict(pools)
        self._pool_of = {fn: pools[cfg.pool] for fn, cfg in config.functions.items()}
        self._runner = runner
        self._cache = cache
        self._gate = Gate(config.exec.max_concurrent, config.exec.queue, "command execution")
        self._sampler = CpuSampler()
        # Set by the server when it traces; None costs each call one test.
        self.tracer: WorkerTracer | None = None

    @property
    def exec_running(self) -> int:
        return self._gate.holders

    async def Echo(self, request: pb.EchoRequest, context: Context) -> pb.EchoReply:
        self.stats.echo_total += 1
        if self.tracer is not None:  # Echo neither waits nor runs anything: a span alone
            self.tracer.call("Echo", context.invocation_metadata()).end(0)
        return pb.EchoReply(payload=request.payload)

    @_tracked("Call")
    @_mapped
    async def Call(self, request: pb.CallRequest, context: Context) -> pb.CallReply:
        name = request.function
        pool = self._pool_of.get(name)
        if pool is None:
            raise errors.NotFound(f"function {name!r} is not in this worker's allowlist")
        self._check_payload("payload", len(request.payload))

        async def run() -> tuple[pb.CallReply, int]:
            call = _CALL.get()
            work = None if call is None else call.task(pool.name, name)
            outcome = await pool.run(name, request.payload, request.timeout_ms / 1000, work)
            reply = outcome_reply(name, outcome)
            return reply, reply.ByteSize()

        if not self.config.functions[name].cacheable:
            return (await run())[0]
        return await self._cached(
            b"Call\0" + request.SerializeToString(deterministic=True), run, context
        )

    @_tracked("Exec")
    @_mapped
    async def Exec(self, request: pb.ExecRequest, context: Context) -> pb.ExecReply:
        job = self._prepare(request)

        async def run() -> tuple[pb.ExecReply, int]:
            limit = self.config.exec.max_output_bytes
            out = {1: bytearray(), 2: bytearray()}
            truncated = False
            try:
                async for item in self._command(job, request.stdin):
                    if isinstance(item, Output):
                        buf = out[item.fd]
                        room = limit - len(buf)
                        truncated = truncated or len(item.data) > room
                        buf += item.data[: max(0, room)]
                    else:
                        result = item
            except errors.TaskTimeout as exc:
                exc.stdout, exc.stderr = bytes(out[1]), bytes(out[2])
                raise
            reply = pb.ExecReply(
                exit_code=result.exit_code,
                stdout=bytes(out[1]),
                stderr=bytes(out[2]),
                duration_seconds=result.duration,
                pid=result.pid,
                truncated=truncated,
                attempts=result.attempts,
            )
            return reply, reply.ByteSize()

        if not job.config.cacheable:
            return (await run())[0]
        return await self._cached(
            b"Exec\0" + request.SerializeToString(deterministic=True), run, context
        )

    @_tracked("ExecStream")
    @_mapped_stream
    async def ExecStream(
        self, request: pb.ExecRequest, context: Context
    ) -> AsyncIterator[pb.ExecChunk]:
        job = self._prepare(request)
        # Closed here, not when collected: a client that leaves frees the slot at once.
        async with contextlib.aclosing(self._command(job, request.stdin)) as items:
            async for item in items:
                if isinstance(item, Output):
                    if item.fd == 1:
                        yield pb.ExecChunk(stdout=item.data)
                    else:
                        yield pb.ExecChunk(stderr=item.data)
                else:
                    yield pb.ExecChunk(exit=_exit(item))

    @_tracked("CallStream")
    async def CallStream(
        self, request_iterator: AsyncIterator[pb.CallBatch], context: Context
    ) -> AsyncIterator[pb.CallResults]:
        # Items fail one by one, each with its own status in its result.
        async for finished in run_call_stream(
            request_iterator,
            self._pool_of,
            self.config.max_payload_bytes,
            self.config.stream_window,
            _CALL.get(),
        ):
            yield pb.CallResults(results=[_result(item, done) for item, done in finished])

    @_tracked("Stats")
    @_mapped
    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsReply:
        return stats_reply(self.stats, self._pools.values(), self._cache, self.exec_running)

    @_tracked("ListProcesses")
    @_mapped
    async def ListProcesses(
        self, request: pb.ListProcessesRequest, context: Context
    ) -> pb.ListProcessesReply:
        found = list_processes(
            self._sampler, self._pools.values(), self._runner.running, self._runner.spawner_pids()
        )
        return pb.ListProcessesReply(processes=found)

    @_tracked("GetProcess")
    @_mapped
    async def GetProcess(self, request: pb.GetProcessRequest, context: Context) -> pb.ProcessInfo:
        found = list_processes(
            self._sampler, self._pools.values(), self._runner.running, self._runner.spawner_pids()
        )
        for info in found:
            if info.pid == request.pid:
                return info
        raise errors.NotFound(f"pid {request.pid} is not a process of this worker")

    # -- helpers -------------------------------------------------------------------

    def _check_payload(self, field: str, size: int) -> None:
        limit = self.config.max_payload_bytes
        if size > limit:
            raise errors.InvalidRequest(f"{field} is {size} bytes; the limit is {limit}")

    async def _command(self, job: Prepared, stdin: bytes) -> AsyncGenerator[Output | ExecResult]:
        """A command's output, then how it ended, once an exec slot is free."""
        call = _CALL.get()
        work = None if call is None else call.command(job.name)
        try:
            async with self._gate:
                if work is not None:
                    job = job.traced(work.taken())
                async for item in self._runner.stream(job, stdin):
                    if work is not None and isinstance(item, ExecResult):
                        work.exited(item.exit_code)
                    yield item
        except BaseException as exc:
            if work is not None:
                work.done(str(exc) or type(exc).__name__)
            raise

    def _prepare(self, request: pb.ExecRequest) -> Prepared:
        self._check_payload("stdin", len(request.stdin))
        return self._runner.prepare(
            request.command, request.args, request.env, request.cwd, request.timeout_ms / 1000
        )

    async def _cached(
        self, key: bytes, run: Callable[[], Awaitable[tuple[Resp, int]]], context: Context
    ) -> Resp:
        reply, lookup = await self._cache.get_or_run(key, run)
        context.set_trailing_metadata((("shoal-cache", lookup),))
        call = _CALL.get()
        if call is not None:
            call.cached(lookup)
        return cast(Resp, reply)


def _result(item: pb.CallItem, done: TaskOutcome | errors.WorkerError) -> pb.CallResult:
    if isinstance(done, TaskOutcome):
        try:
            reply = outcome_reply(item.function, done)
        except errors.WorkerError as exc:
            done = exc
        else:
            return pb.CallResult(
                id=item.id, result=reply.result, pid=reply.pid, run_seconds=reply.run_seconds
            )
    return pb.CallResult(id=item.id, code=CODES(done).value[0], message=str(done))


def _exit(result: ExecResult) -> pb.ExecExit:
    return pb.ExecExit(
        exit_code=result.exit_code,
        duration_seconds=result.duration,
        pid=result.pid,
        attempts=result.attempts,
    )
