"""Running allowlisted commands: argv lists only, never a shell.

A command runs in its own process group with a deadline; past it the whole
group is killed and the caller gets what it printed so far. When the leader
exits, whatever it left running in its group is killed too, so a command
cannot leave orphans or hold its output pipes open. The restart policy reruns
a one-shot command as the table in ``policy`` says, at most ``max_restarts``
times and within the one deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from worker_node.config import CommandConfig
from worker_node.errors import (
    InvalidRequest,
    MissingExecutable,
    NotFound,
    PermissionDenied,
    TaskTimeout,
)
from worker_node.limits import LimitSpec, Watchdog, resolve_limits, rlimit_argv, split_limits
from worker_node.policy import should_rerun
from worker_node.procs import kill_tree, new_group_kwargs

__all__ = ["ExecResult", "ExecRunner", "Output", "Prepared"]

# After the leader exits, how long its leftovers may keep the pipes open.
LEFTOVER_GRACE = 0.2


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked request: what exactly will run."""

    name: str
    argv: list[str]
    env: dict[str, str] | None  # None: the worker's environment
    cwd: str | None
    timeout: float
    config: CommandConfig
    watched: LimitSpec


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk of output: ``fd`` 1 for stdout, 2 for stderr."""

    fd: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a command ended."""

    exit_code: int
    duration: float
    pid: int
    attempts: int


def _find_program(name: str, program: str, path: str | None, cwd: str | None) -> str:
    if os.path.dirname(program):
        full = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
        if os.path.isfile(full) and os.access(full, os.X_OK):
            return full
    else:
        found = shutil.which(program, path=path)
        if found is not None:
            return found
    raise MissingExecutable(
        f"command {name!r}: program {program!r} was not found or is not executable"
    )


class ExecRunner:
    """Checks Exec requests against the allowlist and runs them."""

    def __init__(self, commands: Mapping[str, CommandConfig]) -> None:
        self._commands = dict(commands)
        # (what rlimits enforce, what the watchdog must) for each command.
        self._limits = {
            name: split_limits(resolve_limits(cmd.limits, cmd.timeout))
            for name, cmd in self._commands.items()
        }
        self.running: dict[int, str] = {}

    def prepare(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        timeout: float,
    ) -> Prepared:
        """Check a request; raise NotFound, PermissionDenied, InvalidRequest, MissingExecutable."""
        cmd = self._commands.get(name)
        if cmd is None:
            raise NotFound(f"command {name!r} is not in this worker's allowlist")
        if args and not cmd.allow_args:
            raise PermissionDenied(f"command {name!r} does not accept args")
        if any("\0" in a for a in args) or any("\0" in k or "\0" in v for k, v in env.items()):
            raise InvalidRequest("args and env must not contain NUL characters")
        refused = sorted(set(env) - set(cmd.allow_env))
        if refused:
            raise PermissionDenied(
                f"command {name!r} does not let callers set {', '.join(refused)} in env"
            )
        if cwd and not cmd.allow_cwd:
            raise PermissionDenied(f"command {name!r} does not let callers choose cwd")
        workdir = cwd or cmd.cwd
        if workdir and not os.path.isdir(workdir):
            raise InvalidRequest(f"cwd: directory {workdir!r} does not exist")
        full_env: dict[str, str] | None = None  # the worker's own, passed on as it is
        if env or cmd.env or not cmd.inherit_env:
            full_env = {**(os.environ if cmd.inherit_env else {}), **cmd.env, **env}
        path = (os.environ if full_env is None else full_env).get("PATH")
        program = _find_program(name, cmd.argv[0], path, workdir)
        rlimits, watched = self._limits[name]
        argv = rlimit_argv(rlimits, [program, *cmd.argv[1:], *args])
        limit = min(timeout, cmd.timeout) if timeout > 0 else cmd.timeout
        return Prepared(name, argv, full_env, workdir, limit, cmd, watched)

    async def stream(self, job: Prepared, stdin: bytes) -> AsyncIterator[Output | ExecResult]:
        """Output chunks as they come, then one ExecResult; TaskTimeout past the deadline."""
        started = time.monotonic()
        deadline = started + job.timeout
        attempts = 0
        cfg = job.config
        while True:
            attempts += 1
            outcome: tuple[int, int] | None = None
            async with contextlib.aclosing(self._attempt(job, stdin, deadline)) as chunks:
                async for item in chunks:
                    if isinstance(item, Output):
                        yield item
                    else:
                        outcome = item
            assert outcome is not None
            code, pid = outcome
            if not should_rerun(cfg.restart, code, attempts, cfg.max_restarts):
                yield ExecResult(code, time.monotonic() - started, pid, attempts)
                return

    async def _attempt(
        self, job: Prepared, stdin: bytes, deadline: float
    ) -> AsyncGenerator[Output | tuple[int, int]]:
        loop = asyncio.get_running_loop()
        run = _Run(loop)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: run,
                *job.argv,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=job.cwd,
                env=job.env,
                **new_group_kwargs(),  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise MissingExecutable(
                f"command {job.name!r}: cannot run {job.argv[0]!r} ({exc.strerror})"
            ) from exc
        pid = transport.get_pid()
        self.running[pid] = job.name
        if stdin:
            pipe = transport.get_pipe_transport(0)
            assert isinstance(pipe, asyncio.WriteTransport)
            pipe.write(stdin)
            pipe.close()  # once written; a command that exits unread just breaks the pipe
        timer = loop.call_at(loop.time() + deadline - time.monotonic(), run.expire)
        watchdog = None
        if job.watched.any:
            watchdog = Watchdog(pid, job.watched, lambda _why: kill_tree(pid))
            watchdog.start()
        try:
            while True:
                while run.chunks:
                    yield run.take()
                if run.finished:
                    break
                if run.expired:
                    raise TaskTimeout(
                        f"command {job.name!r} ran past its timeout of {job.timeout:g}s; "
                        f"its process group (pid {pid}) was killed"
                    )
                await run.changed()
            code = transport.get_returncode()
            assert code is not None
            yield code, pid
        finally:
            timer.cancel()
            run.stop_reaper()
            if transport.get_returncode() is None:
                kill_tree(pid)
            _kill_group(pid)
            if watchdog is not None:
                watchdog.stop()
            while not run.exited:
                await run.changed()
            transport.close()
            self.running.pop(pid, None)

    def kill_all(self) -> None:
        """Kill every running command (used when the grace period is over)."""
        for pid in list(self.running):
            kill_tree(pid)


class _Run(asyncio.SubprocessProtocol):
    """One attempt's output and exit, gathered by the loop's callbacks, no task of its own.

    At most ``BUFFERED`` chunks wait to be taken; past that the pipes stop being
    read, so a slow consumer holds the command back instead of filling memory.
    When the command exits, what it left in its group has ``LEFTOVER_GRACE`` to
    finish and is then killed, so leftovers cannot hold the pipes open.
    """

    BUFFERED = 16

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.SubprocessTransport | None = None
        self.chunks: collections.deque[Output] = collections.deque()
        self._paused = False
        self._open_pipes = 2
        self.exited = False
        self.expired = False
        self._wake: asyncio.Future[None] | None = None
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def finished(self) -> bool:
        return self.exited and not self._open_pipes and not self.chunks

    def take(self) -> Output:
        chunk = self.chunks.popleft()
        if self._paused and len(self.chunks) < self.BUFFERED // 2:
            self._pause(False)
        return chunk

    async def changed(self) -> None:
        self._wake = self._loop.create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    def expire(self) -> None:
        self.expired = True
        self._notify()

    def stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    # -- protocol callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        self.chunks.append(Output(fd, bytes(data)))
        if not self._paused and len(self.chunks) >= self.BUFFERED:
            self._pause(True)
        self._notify()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self._open_pipes -= 1
            self._notify()

    def process_exited(self) -> None:
        self.exited = True
        if self._transport is not None:
            self._reaper = self._loop.call_later(
                LEFTOVER_GRACE, _kill_group, self._transport.get_pid()
            )
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _pause(self, pause: bool) -> None:
        self._paused = pause
        if self._transport is None:
            return
        for fd in (1, 2):
            pipe = self._transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                if pause:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()


def _kill_group(pid: int) -> None:
    # A command leads its own group (pgid == pid): end whatever is left in it.
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
