"""One pool process as the worker sees it: its pipes, its in-flight tasks, its fate.

Tasks are written to the process in arrival order and it answers in the same
order, so the first in-flight task is the one running and everything behind
it has not started. That is what makes pipelining safe: when a process dies
or is killed for a timeout, only the head task is lost (it fails clearly); the
rest are handed back to the pool to run elsewhere. Only the head task's
timeout is armed, so a task's clock starts when it starts.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from worker_node import tracecontext
from worker_node.errors import WorkerError
from worker_node.procs import describe_exit, kill_tree, new_group_kwargs
from worker_node.protocol import REPLY, REQUEST, STOP, TRACE, Status, encode_request

if TYPE_CHECKING:
    from worker_node.tracing import WorkSpans

__all__ = ["PoolProcess", "PoolStartError", "ProcState", "Task", "TaskOutcome"]

logger = logging.getLogger(__name__)


class PoolStartError(RuntimeError):
    """A pool process could not start: its functions failed to load or it did not answer."""


class TaskOutcome(NamedTuple):
    """What a pool process answered for one task."""

    status: Status
    body: bytes
    seconds: float
    pid: int


@dataclass(slots=True, eq=False)
class Task:
    """One call waiting for, or running in, a pool process."""

    id: int
    function: int
    name: str
    payload: bytes
    timeout: float
    fast: bool
    future: asyncio.Future[TaskOutcome]
    error: WorkerError | None = field(default=None)
    # Its call's spans when the worker traces: taken when it is written to a process.
    trace: WorkSpans | None = field(default=None)


class ProcState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


class Owner(Protocol):
    """What a process reports to its pool."""

    def task_done(self, proc: PoolProcess, task: Task, outcome: TaskOutcome) -> None: ...

    def has_capacity(self, proc: PoolProcess) -> None: ...

    def timed_out(self, proc: PoolProcess, task: Task) -> None: ...

    def exited(self, proc: PoolProcess) -> None: ...


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, proc: PoolProcess) -> None:
        self._proc = proc

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._proc._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._proc._on_lost()


class PoolProcess:
    """A warm Python process running tasks one at a time, fed through its stdin."""

    def __init__(self, owner: Owner, serial: int) -> None:
        self._owner = owner
        self.serial = serial
        self.pid = 0
        self.state = ProcState.STARTING
        self.inflight: collections.deque[Task] = collections.deque()
        self.slow_inflight = 0
        self.tasks_done = 0
        self.started_at = time.monotonic()
        self.idle_since = self.started_at
        # Why the worker ended it ("retired", "shutdown", "timeout", "limit"); None if it died.
        self.stop_reason: str | None = None
        self.returncode: int | None = None
        self.exited = asyncio.Event()
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timed: Task | None = None
        self._ready: asyncio.Future[None] | None = None

    async def start(
        self, argv: list[str], env: dict[str, str], cwd: str | None, init: bytes, timeout: float
    ) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        transport, _ = await loop.subprocess_exec(
            lambda: _Protocol(self),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            env=env,
            cwd=cwd,
            **new_group_kwargs(),  # type: ignore[arg-type]
        )
        self._transport = transport
        self.pid = transport.get_pid()
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        self._stdin = stdin
        stdin.write(init)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self.kill("start-timeout")
            await asyncio.shield(self.exited.wait())
            raise PoolStartError(
                f"pool process {self.pid} did not become ready within {timeout:g}s"
            ) from None
        except BaseException:
            self.kill("start-failed")
            await asyncio.shield(self.exited.wait())
            raise
        if self.state is ProcState.DEAD:
            raise PoolStartError(
                f"pool process {self.pid} exited right after start-up ({self.exit_description})"
            )
        self.state = ProcState.READY
        self.idle_since = time.monotonic()

    def send(self, task: Task) -> None:
        self.inflight.append(task)
        if not task.fast:
            self.slow_inflight += 1
        if task.trace is not None:
            context = task.trace.taken(pid=self.pid)
            if context:
                self._out.append(encode_request(0, TRACE, tracecontext.encode(context)))
        self._out.append(REQUEST.pack(len(task.payload), task.id, task.function))
        self._out.append(task.payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if len(self.inflight) == 1:
            self._arm()

    def retire(self, reason: str) -> None:
        """Ask the process to exit once the tasks already sent to it are done."""
        if self.state in (ProcState.STOPPING, ProcState.DEAD):
            return
        self.state = ProcState.STOPPING
        self.stop_reason = self.stop_reason or reason
        self._out.append(REQUEST.pack(0, 0, STOP))
        self._flush()

    def kill(self, reason: str) -> None:
        """Kill the process and its whole group now."""
        if self.state is ProcState.DEAD or not self.pid:
            return
        self.stop_reason = self.stop_reason or reason
        if self.state is not ProcState.STARTING:
            self.state = ProcState.STOPPING
        kill_tree(self.pid)

    @property
    def exit_description(self) -> str:
        return describe_exit(self.returncode)

    # -- protocol callbacks ------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(b"".join(self._out))
        self._out.clear()

    def _arm(self) -> None:
        head = self.inflight[0] if self.inflight else None
        if head is self._timed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timed = head
        if head is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(head.timeout, self._on_timeout, head)

    def _on_timeout(self, task: Task) -> None:
        self._timer = None
        if self.inflight and self.inflight[0] is task and self.state is not ProcState.DEAD:
            self.kill("timeout")
            self._owner.timed_out(self, task)

    def _on_data(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        size = REPLY.size
        owner = self._owner
        pid = self.pid
        done_any = False
        while len(buf) - pos >= size:
            length, task_id, status, seconds = REPLY.unpack_from(buf, pos)
            end = pos + size + length
            if len(buf) < end:
                break
            body = bytes(buf[pos + size : end])
            pos = end
            if status >= Status.READY:
                self._on_control(Status(status), body)
                continue
            if not self.inflight or self.inflight[0].id != task_id:
                logger.error(
                    "pool process %d answered task %d out of order; killing it", pid, task_id
                )
                self.kill("protocol-error")
                break
            task = self.inflight.popleft()
            if not task.fast:
                self.slow_inflight -= 1
            self.tasks_done += 1
            done_any = True
            owner.task_done(self, task, TaskOutcome(Status(status), body, seconds, pid))
        del buf[:pos]
        if done_any:
            self._arm()
            if not self.inflight:
                self.idle_since = time.monotonic()
            if self.state is ProcState.READY:
                owner.has_capacity(self)

    def _on_control(self, status: Status, body: bytes) -> None:
        ready = self._ready
        if ready is None or ready.done():
            return
        if status is Status.READY:
            ready.set_result(None)
        else:
            ready.set_exception(PoolStartError(body.decode(errors="replace")))

    def _on_lost(self) -> None:
        was_starting = self.state is ProcState.STARTING
        self.state = ProcState.DEAD
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is not None:
            self.returncode = transport.get_returncode()
            transport.close()
        self.exited.set()
        if was_starting:
            ready = self._ready
            if ready is not None and not ready.done():
                ready.set_exception(
                    PoolStartError(
                        f"pool process {self.pid} exited during start-up ({self.exit_description})"
                    )
                )
            return
        self._owner.exited(self)
