"""Supervising the processes of a local mesh.

Each child is a ``shoal`` subcommand that prints one ready line (``... serving on
ADDR``) on stdout once it serves. Children run in their own session, so a Ctrl-C
at the terminal reaches only the supervisor, which then stops them in the order
it chooses (sidecars first, so they drain and deregister before their apps go).
They also get ``SHOAL_PARENT_PID`` and drain by themselves if the supervisor
dies without stopping them, so a killed ``shoal up`` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shoal_core.backoff import Attempts, Backoff

__all__ = ["Child", "ChildSpec", "Restart", "StartError", "Supervisor"]

logger = logging.getLogger(__name__)

READY_MARK = " serving on "
# Restarts are paced by the one backoff (doubling from 0.5 s up to 15 s, jittered); a
# child that stayed up for `STABLE_AFTER` seconds is healthy again and starts over.
RESTART_BACKOFF = Backoff(initial=0.5, maximum=15.0)
STABLE_AFTER = 30.0


class Restart(enum.Enum):
    """When a child that exited is started again."""

    NEVER = "never"
    ALWAYS = "always"
    ON_FAILURE = "on-failure"

    def wants_restart(self, returncode: int) -> bool:
        return self is Restart.ALWAYS or (self is Restart.ON_FAILURE and returncode != 0)


class StartError(RuntimeError):
    """A child exited or stayed silent instead of printing its ready line."""


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """How to run one child."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: Restart = Restart.ON_FAILURE
    ready_timeout: float = 30.0
    stop_grace: float = 5.0


@dataclass
class Child:
    """A running child and what the supervisor knows of it."""

    spec: ChildSpec
    proc: asyncio.subprocess.Process
    address: str
    log_path: Path
    started_at: float
    restarts: int = 0
    watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor:
    """Starts children, restarts them per policy, stops them in reverse order."""

    def __init__(self, log_dir: Path, on_event: Callable[[str], None]) -> None:
        self._log_dir = log_dir
        self._on_event = on_event
        self._children: list[Child] = []
        self._stopping = False

    @property
    def children(self) -> list[Child]:
        return list(self._children)

    @property
    def log_dir(self) -> Path:
        return self._log_dir

    def tell(self, message: str) -> None:
        """Pass ``message`` to ``on_event``; a failing callback never stops supervision."""
        try:
            self._on_event(message)
        except Exception:
            logger.exception("on_event failed for %r", message)

    def kill_all(self) -> None:
        """Kill every child and everything it started, now: the forcing second Ctrl-C."""
        self._stopping = True
        for child in self._children:
            _kill_tree(child.proc.pid)

    async def start(self, spec: ChildSpec) -> Child:
        """Start ``spec`` and wait for its ready line; raise ``StartError`` if it never comes."""
        proc, address, log_path = await self._spawn(spec)
        child = Child(spec, proc, address, log_path, time.monotonic())
        self._children.append(child)
        child.watcher = asyncio.create_task(self._watch(child), name=f"watch-{spec.name}")
        return child

    async def _spawn(self, spec: ChildSpec) -> tuple[asyncio.subprocess.Process, str, Path]:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{spec.name}.log"
        env = {**os.environ, **spec.env, "SHOAL_PARENT_PID": str(os.getpid())}
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        try:
            address = await asyncio.wait_for(self._ready_line(proc), spec.ready_timeout)
        except (TimeoutError, StartError) as exc:
            await self._terminate(proc, grace=1.0)
            reason = "stayed silent" if isinstance(exc, TimeoutError) else str(exc)
            raise StartError(f"{spec.name} did not start ({reason}); see {log_path}") from None
        except asyncio.CancelledError:
            # Stopped while it was starting (Ctrl-C early on): it is no child of ours yet,
            # so nothing else would stop it.
            await self._terminate(proc, grace=1.0)
            raise
        return proc, address, log_path

    @staticmethod
    async def _ready_line(proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode(errors="replace")
            if not line:
                code = await proc.wait()
                raise StartError(f"exited with status {code}")
            if READY_MARK in line:
                # "shoal sidecar serving on ADDR (admin on port N)": the address is one word.
                return line.split(READY_MARK, 1)[1].split()[0]

    async def _watch(self, child: Child) -> None:
        """Drain the child's stdout, and restart it per policy when it exits."""
        attempts = Attempts(RESTART_BACKOFF)
        while True:
            assert child.proc.stdout is not None
            while await child.proc.stdout.read(65536):
                pass  # keep the pipe from filling; everything useful went to the log
            code = await child.proc.wait()
            _kill_group(child.proc.pid)  # whatever the dead child left running goes too
            if self._stopping:
                return
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
            if not child.spec.restart.wants_restart(code):
                self.tell(
                    f"{child.spec.name} {how}; restart policy "
                    f"{child.spec.restart.value}: left stopped"
                )
                return
            if time.monotonic() - child.started_at > STABLE_AFTER:
                attempts.succeeded()
            delay = attempts.failed()
            self.tell(f"{child.spec.name} {how}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                child.proc, child.address, _ = await self._spawn(child.spec)
            except StartError as exc:
                self.tell(str(exc))
                continue
            child.started_at = time.monotonic()
            child.restarts += 1
            self.tell(f"{child.spec.name} restarted (pid {child.pid}) on {child.address}")

    async def stop(self, groups: Sequence[Sequence[Child]] | None = None) -> None:
        """Stop every child: group by group in the order given, else newest first."""
        self._stopping = True
        order = groups if groups is not None else [[c] for c in reversed(self._children)]
        seen: set[int] = set()
        for group in order:
            await asyncio.gather(*(self._stop_child(c) for c in group))
            seen.update(id(c) for c in group)
        rest = [c for c in self._children if id(c) not in seen]
        await asyncio.gather(*(self._stop_child(c) for c in rest))

    async def _stop_child(self, child: Child) -> None:
        await self._terminate(child.proc, child.spec.stop_grace)
        if child.watcher is not None:
            child.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await child.watcher

    @staticmethod
    async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
        if proc.returncode is None:
            # Not proc.send_signal(): subprocess polls (reaps) the child first, and a child
            # that has just died is then gone before asyncio's watcher can collect it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                logger.warning("pid %d did not stop within %.1fs; killing it", proc.pid, grace)
                _kill_tree(proc.pid)
                await proc.wait()
        _kill_group(proc.pid)


def _kill_tree(pid: int) -> None:
    """Kill a running child, its group, and what it started in groups of their own.

    A worker's pool processes lead their own sessions; killed with the worker alone,
    they would run on until they notice (a pool process busy in a call may not).
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    _kill_group(pid)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _kill_group(pgid: int) -> None:
    """Kill what is left of a child's process group (its session is its own group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
