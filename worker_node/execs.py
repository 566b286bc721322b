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
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

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

T = TypeVar("T")
READ_SIZE = 64 * 1024
# After the leader exits, how long its leftovers may keep the pipes open.
LEFTOVER_GRACE = 0.2


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked request: what exactly will run."""

    name: str
    argv: list[str]
    env: dict[str, str]
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
        base = dict(os.environ) if cmd.inherit_env else {}
        full_env = {**base, **cmd.env, **env}
        program = _find_program(name, cmd.argv[0], full_env.get("PATH"), workdir)
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
        try:
            proc = await asyncio.create_subprocess_exec(
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
        self.running[proc.pid] = job.name
        queue: asyncio.Queue[Output | None] = asyncio.Queue(maxsize=16)
        helpers = [
            asyncio.create_task(_pump(proc.stdout, 1, queue)),
            asyncio.create_task(_pump(proc.stderr, 2, queue)),
            asyncio.create_task(_reap_leftovers(proc)),
        ]
        if stdin:
            helpers.append(asyncio.create_task(_feed(proc, stdin)))
        watchdog = None
        if job.watched.any:
            watchdog = Watchdog(proc.pid, job.watched, lambda _why: kill_tree(proc.pid))
            watchdog.start()
        try:
            open_pipes = 2
            while open_pipes:
                item = await _before(queue.get(), deadline)
                if item is None:
                    open_pipes -= 1
                else:
                    yield item
            code = await _before(proc.wait(), deadline)
            yield code, proc.pid
        except TimeoutError:
            raise TaskTimeout(
                f"command {job.name!r} ran past its timeout of {job.timeout:g}s; "
                f"its process group (pid {proc.pid}) was killed"
            ) from None
        finally:
            if proc.returncode is None:
                kill_tree(proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGKILL)
            if watchdog is not None:
                watchdog.stop()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await proc.wait()
            self.running.pop(proc.pid, None)

    def kill_all(self) -> None:
        """Kill every running command (used when the grace period is over)."""
        for pid in list(self.running):
            kill_tree(pid)


async def _before(aw: Awaitable[T], deadline: float) -> T:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return await asyncio.wait_for(aw, remaining)


async def _pump(
    stream: asyncio.StreamReader | None, fd: int, queue: asyncio.Queue[Output | None]
) -> None:
    if stream is not None:
        while chunk := await stream.read(READ_SIZE):
            await queue.put(Output(fd, chunk))
    await queue.put(None)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()
        await proc.stdin.wait_closed()


async def _reap_leftovers(proc: asyncio.subprocess.Process) -> None:
    # What the command left running in its group would hold our pipes open: end it.
    await proc.wait()
    await asyncio.sleep(LEFTOVER_GRACE)
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
