"""One running command: its output and exit, gathered by event-loop callbacks.

A command is started by the worker itself (``loop.subprocess_exec``; limits, if
any, through the trampoline in its argv) or by a spawner that holds its limits
(``spawn``). Either way it leads its own process group, and one ``Command``
gathers what it prints and how it ends, with no task of its own. At most
``BUFFERED`` chunks wait to be taken; past that its pipes stop being read, so
a slow consumer holds the command back instead of filling memory. When the
command exits, what it left in its group has ``LEFTOVER_GRACE`` to finish and
is then killed, so leftovers cannot hold the pipes open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from worker_node.errors import WorkerError
from worker_node.procs import new_group_kwargs
from worker_node.spawn import Spawned, Spawner

__all__ = ["LEFTOVER_GRACE", "Command", "Output", "kill_group", "start_direct", "start_spawned"]

# After the leader exits, how long its leftovers may keep the pipes open.
LEFTOVER_GRACE = 0.2
READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of output: ``fd`` 1 for stdout, 2 for stderr."""

    fd: int
    data: bytes


def kill_group(pid: int) -> None:
    """SIGKILL what is left of a command's process group (it leads it: pgid == pid)."""
    if os.name == "posix" and pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class Command:
    """A started command's output chunks, exit and deadline; see the module docstring."""

    BUFFERED = 16

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.pid = 0
        self.returncode: int | None = None
        # Set when the spawner that started it died: how it ended is unknown.
        self.lost: WorkerError | None = None
        self.chunks: collections.deque[Output] = collections.deque()
        self.exited = False
        self.expired = False
        self._open_pipes = 2
        self._paused = False
        self._wake: asyncio.Future[None] | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self._pause: Callable[[bool], None] = lambda _pause: None
        self._release: Callable[[], None] = lambda: None

    @property
    def finished(self) -> bool:
        """Exited, both pipes closed and every chunk taken."""
        return self.exited and not self._open_pipes and not self.chunks

    def take(self) -> Output:
        chunk = self.chunks.popleft()
        if self._paused and len(self.chunks) < self.BUFFERED // 2:
            self._paused = False
            self._pause(False)
        return chunk

    async def changed(self) -> None:
        """Wait until output, a pipe closing, the exit or the deadline."""
        self._wake = self._loop.create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    def expire(self) -> None:
        self.expired = True
        self._notify()

    def release(self) -> None:
        """Let go of pipes and timers; call once the process has exited or been killed."""
        if self._reaper is not None:
            self._reaper.cancel()
        self._release()

    # -- fed by the starters -------------------------------------------------------

    def _data(self, fd: int, data: bytes) -> None:
        self.chunks.append(Output(fd, data))
        if not self._paused and len(self.chunks) >= self.BUFFERED:
            self._paused = True
            self._pause(True)
        self._notify()

    def _pipe_closed(self) -> None:
        self._open_pipes -= 1
        self._notify()

    def _exited(self, returncode: int | None, lost: WorkerError | None = None) -> None:
        self.exited = True
        self.returncode = returncode
        self.lost = lost
        if lost is not None:
            kill_group(self.pid)  # nobody is left to report on it
        else:
            self._reaper = self._loop.call_later(LEFTOVER_GRACE, kill_group, self.pid)
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class _Direct(asyncio.SubprocessProtocol):
    """Feeds a Command from ``loop.subprocess_exec``'s callbacks."""

    def __init__(self, command: Command) -> None:
        self._command = command
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport
        self._command.pid = transport.get_pid()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        self._command._data(fd, bytes(data))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self._command._pipe_closed()

    def process_exited(self) -> None:
        assert self._transport is not None
        self._command._exited(self._transport.get_returncode())

    def pause(self, pause: bool) -> None:
        if self._transport is None:
            return
        for fd in (1, 2):
            pipe = self._transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                if pause:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()


async def start_direct(
    argv: list[str], env: dict[str, str] | None, cwd: str | None, stdin: bytes
) -> Command:
    """Start ``argv`` from the worker itself; raise OSError if it cannot be run."""
    loop = asyncio.get_running_loop()
    command = Command(loop)
    protocol = _Direct(command)
    transport, _ = await loop.subprocess_exec(
        lambda: protocol,
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
        **new_group_kwargs(),  # type: ignore[arg-type]
    )
    command._pause = protocol.pause
    command._release = transport.close
    if stdin:
        pipe = transport.get_pipe_transport(0)
        assert isinstance(pipe, asyncio.WriteTransport)
        pipe.write(stdin)
        pipe.close()  # once written; a command that exits unread just breaks the pipe
    return command


async def start_spawned(
    spawner: Spawner, argv: list[str], env: dict[str, str] | None, cwd: str | None, stdin: bytes
) -> Command | None:
    """Start ``argv`` through ``spawner``; None if the request is too large for it.

    Raises OSError if it cannot be run, ProcessDied if the spawner is gone.
    """
    spawned = await spawner.spawn(argv, env, cwd, bool(stdin))
    if spawned is None:
        return None
    command = Command(asyncio.get_running_loop())
    command.pid = spawned.pid
    _Pipes(command, spawned, stdin)
    return command


class _Pipes:
    """Reads a spawned command's stdout and stderr and writes its stdin, by loop callbacks."""

    def __init__(self, command: Command, spawned: Spawned, stdin: bytes) -> None:
        self._loop = asyncio.get_running_loop()
        self._command = command
        self._reading = {spawned.stdout: 1, spawned.stderr: 2}
        self._stdin = spawned.stdin
        self._pending = memoryview(stdin)
        for fd in (*self._reading, *([spawned.stdin] if spawned.stdin is not None else [])):
            os.set_blocking(fd, False)
        self._listen(True)
        if self._stdin is not None:
            self._loop.add_writer(self._stdin, self._writable)
        command._pause = lambda pause: self._listen(not pause)
        command._release = self.close
        spawned.exit.add_done_callback(self._on_exit)

    def close(self) -> None:
        for fd in list(self._reading):
            self._done_reading(fd, notify=False)
        self._done_writing()

    def _listen(self, on: bool) -> None:
        for fd in self._reading:
            if on:
                self._loop.add_reader(fd, self._readable, fd)
            else:
                self._loop.remove_reader(fd)

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._command._data(self._reading[fd], data)
        else:
            self._done_reading(fd, notify=True)

    def _done_reading(self, fd: int, *, notify: bool) -> None:
        if self._reading.pop(fd, None) is None:
            return
        self._loop.remove_reader(fd)
        os.close(fd)
        if notify:
            self._command._pipe_closed()

    def _writable(self) -> None:
        assert self._stdin is not None
        try:
            written = os.write(self._stdin, self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the command closed its stdin or exited unread
            written = len(self._pending)
        self._pending = self._pending[written:]
        if not self._pending:
            self._done_writing()

    def _done_writing(self) -> None:
        if self._stdin is not None:
            self._loop.remove_writer(self._stdin)
            os.close(self._stdin)
            self._stdin = None

    def _on_exit(self, done: asyncio.Future[int]) -> None:
        if done.cancelled():
            return
        lost = done.exception()
        if lost is None:
            self._command._exited(done.result())
        else:
            error = lost if isinstance(lost, WorkerError) else WorkerError(str(lost))
            self._command._exited(None, error)
