"""Running allowlisted commands: argv lists only, never a shell.

A command runs in its own process group with a deadline; past it the whole
group is killed and the caller gets what it printed so far. When the leader
exits, whatever it left running in its group is killed too, so a command
cannot leave orphans or hold its output pipes open. The restart policy reruns
a one-shot command as the table in ``policy`` says, at most ``max_restarts``
times and within the one deadline.

Its rlimits hold from its first instruction: a spawner that holds them starts
it (``spawn``), or where none can, the trampoline in its argv sets them
(``limits.rlimit_argv``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from worker_node.cmdproc import Command, Output, kill_group, start_direct, start_spawned
from worker_node.config import CommandConfig
from worker_node.errors import (
    InvalidRequest,
    MissingExecutable,
    NotFound,
    PermissionDenied,
    ProcessDied,
    TaskTimeout,
)
from worker_node.limits import (
    LimitSpec,
    Watchdog,
    encode_rlimits,
    resolve_limits,
    rlimit_argv,
    rlimit_pairs,
    split_limits,
)
from worker_node.policy import should_rerun
from worker_node.procs import kill_tree
from worker_node.spawn import Spawners, SpawnerUnavailable, spawnable

__all__ = ["ExecResult", "ExecRunner", "Output", "Prepared"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked request: what exactly will run."""

    name: str
    argv: list[str]
    env: dict[str, str] | None  # None: the worker's environment
    cwd: str | None
    timeout: float
    config: CommandConfig

    def traced(self, context: Mapping[str, str]) -> Prepared:
        """This command with a W3C trace context (``traceparent``, ``tracestate``) in its
        environment as ``TRACEPARENT`` and ``TRACESTATE``, the names otel-cli and other
        tools read; any the worker itself was started with are replaced."""
        if not context:
            return self
        env = dict(os.environ if self.env is None else self.env)
        env.pop("TRACESTATE", None)
        env.update((key.upper(), value) for key, value in context.items())
        return dataclasses.replace(self, env=env)


@dataclass(slots=True)
class _Limits:
    """How one command's limits are kept: rlimits (a spawner or the trampoline), a watchdog."""

    rlimits: LimitSpec
    watched: LimitSpec
    spawner: str | None  # the encoded rlimits a spawner holds, if one can


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
        self._limits = {name: _limits_of(cmd) for name, cmd in self._commands.items()}
        self._spawners = Spawners()
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
        limit = min(timeout, cmd.timeout) if timeout > 0 else cmd.timeout
        return Prepared(name, [program, *cmd.argv[1:], *args], full_env, workdir, limit, cmd)

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
        limits = self._limits[job.name]
        try:
            command = await self._start(job, limits, stdin)
        except OSError as exc:
            raise MissingExecutable(
                f"command {job.name!r}: cannot run {job.argv[0]!r} ({exc.strerror})"
            ) from exc
        pid = command.pid
        self.running[pid] = job.name
        timer = loop.call_at(loop.time() + deadline - time.monotonic(), command.expire)
        watchdog = None
        if limits.watched.any:
            watchdog = Watchdog(pid, limits.watched, lambda _why: kill_tree(pid))
            watchdog.start()
        try:
            while True:
                while command.chunks:
                    yield command.take()
                if command.finished:
                    break
                if command.expired:
                    raise TaskTimeout(
                        f"command {job.name!r} ran past its timeout of {job.timeout:g}s; "
                        f"its process group (pid {pid}) was killed"
                    )
                await command.changed()
            if command.lost is not None:
                raise ProcessDied(
                    f"command {job.name!r}: {command.lost}; "
                    f"its process group (pid {pid}) was killed"
                )
            assert command.returncode is not None
            yield command.returncode, pid
        finally:
            timer.cancel()
            if not command.exited:
                kill_tree(pid)
            kill_group(pid)
            if watchdog is not None:
                watchdog.stop()
            while not command.exited:
                await command.changed()
            command.release()
            self.running.pop(pid, None)

    async def _start(self, job: Prepared, limits: _Limits, stdin: bytes) -> Command:
        for _ in range(2):  # a spawner found dead is replaced once
            if limits.spawner is None:
                break
            try:
                spawner = await self._spawners.get(limits.spawner, limits.rlimits.cpu_seconds)
            except OSError as exc:
                logger.warning(
                    "command %r: no spawner could start (%s); using the trampoline", job.name, exc
                )
                limits.spawner = None
                break
            try:
                command = await start_spawned(spawner, job.argv, job.env, job.cwd, stdin)
            except SpawnerUnavailable:
                continue
            if command is None:  # too large a request for a spawner
                break
            return command
        argv = rlimit_argv(limits.rlimits, job.argv)
        return await start_direct(argv, job.env, job.cwd, stdin)

    def kill_all(self) -> None:
        """Kill every running command (used when the grace period is over)."""
        for pid in list(self.running):
            kill_tree(pid)

    def spawner_pids(self) -> list[int]:
        return self._spawners.pids()

    async def close(self) -> None:
        """Stop the spawners (after ``kill_all``)."""
        await self._spawners.close()


def _limits_of(cmd: CommandConfig) -> _Limits:
    rlimits, watched = split_limits(resolve_limits(cmd.limits, cmd.timeout))
    pairs = rlimit_pairs(rlimits)
    return _Limits(rlimits, watched, encode_rlimits(pairs) if spawnable(pairs) else None)
