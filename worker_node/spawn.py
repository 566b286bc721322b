"""Starting commands under rlimits without a trampoline exec: spawner processes.

A command's rlimits must hold from its first instruction, and the worker, a
threaded process, may not run code between fork and exec. A trampoline
(``prlimit``) costs a second exec per command, which on a busy machine costs
as much as the command itself. A spawner (``worker_node/spawner.py``) is a
small single-threaded process that has set one set of limits on itself, soft
and hard; it starts each command with a plain vfork+exec, so the command
inherits exactly those limits. The worker creates the command's pipes and hands
their far ends over (SCM_RIGHTS); the spawner answers with the pid and later the
exit code. The command leads its own process group, as one the worker starts
itself does, so deadline and leftover kills are unchanged.

There is one spawner per set of limits in use, started on first use. Its own
CPU time counts against the CPU limit it holds, so once it has used half of it
the next command goes to a fresh spawner and the old one exits after its last
command. When a spawner dies its commands are killed and their calls fail; when
the worker dies its spawners see the socket close and kill their commands. Only
on Linux (SOCK_SEQPACKET, pidfds), and only for limits a Python process can run
under; elsewhere commands start through the trampoline.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker_node.errors import ProcessDied, ShuttingDown

__all__ = ["Spawned", "Spawner", "SpawnerUnavailable", "Spawners", "spawnable"]

logger = logging.getLogger(__name__)

SCRIPT = str(Path(__file__).with_name("spawner.py"))
# Requests larger than this (a huge argv or environment) go through the trampoline.
MAX_REQUEST = 64 * 1024
START_TIMEOUT = 15.0
# Below these a Python process cannot be relied on to start.
_LEAST = {"AS": 256 * 1024 * 1024, "NOFILE": 64}
_LINUX = sys.platform.startswith("linux")


def spawnable(pairs: list[tuple[str, int, int]]) -> bool:
    """Whether a spawner can hold these (name, soft, hard) rlimits."""
    return _LINUX and bool(pairs) and all(soft >= _LEAST.get(name, 0) for name, soft, _ in pairs)


class SpawnerUnavailable(ProcessDied):
    """The spawner had gone before it was sent the request: nothing was started."""


@dataclass(frozen=True, slots=True)
class Spawned:
    """A command a spawner started: its pid, our ends of its pipes, its exit code to come."""

    pid: int
    stdout: int
    stderr: int
    stdin: int | None
    exit: asyncio.Future[int]


class _Life(asyncio.SubprocessProtocol):
    def __init__(self, spawner: Spawner) -> None:
        self._spawner = spawner

    def process_exited(self) -> None:
        self._spawner._lost("exited")


class Spawner:
    """One spawner process holding one set of rlimits; see the module docstring."""

    def __init__(self, limits: str, cpu_seconds: int | None) -> None:
        self._limits = limits
        # Past this much CPU of its own the spawner takes no more commands.
        self.retire_after = cpu_seconds / 2 if cpu_seconds is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._ids = itertools.count(1)
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._abandoned: set[int] = set()
        self._gone: asyncio.Event | None = None
        self.dead = False
        self.draining = False
        self.pid = 0

    @property
    def usable(self) -> bool:
        return not self.dead and not self.draining

    @property
    def gone(self) -> bool:
        """The process has exited."""
        return self._gone is not None and self._gone.is_set()

    async def start(self) -> None:
        """Start the process and wait until it holds its limits; raise OSError if it cannot."""
        loop = self._loop = asyncio.get_running_loop()
        self._gone = asyncio.Event()
        self._ready = loop.create_future()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _Life(self),
                sys.executable,
                "-I",
                "-S",
                SCRIPT,
                str(theirs.fileno()),
                self._limits,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=None,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C is for the worker
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._transport = transport
        self.pid = transport.get_pid()
        self._sock = ours
        ours.setblocking(False)
        loop.add_reader(ours.fileno(), self._readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    async def spawn(
        self, argv: list[str], env: dict[str, str] | None, cwd: str | None, with_stdin: bool
    ) -> Spawned | None:
        """Start a command; None if the request is too large for a spawner to take.

        Raises OSError as ``subprocess.Popen`` would, SpawnerUnavailable if the spawner
        had gone before the request was sent, ProcessDied if it died answering it.
        """
        if self.dead:
            raise SpawnerUnavailable("the command spawner has exited")
        assert self._loop is not None
        request_id = next(self._ids)
        body = json.dumps({"id": request_id, "argv": argv, "env": env, "cwd": cwd}).encode()
        if len(body) > MAX_REQUEST:
            return None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if with_stdin:
            in_r, in_w = os.pipe()
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), None
        ours = [fd for fd in (out_r, err_r, in_w) if fd is not None]
        reply: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        try:
            try:
                sent = await self._send(body, [in_r, out_w, err_w])
            finally:
                for fd in (in_r, out_w, err_w):
                    os.close(fd)
            if not sent:
                for fd in ours:
                    os.close(fd)
                return None
            self._pending[request_id] = reply
            answer = await reply
        except BaseException:
            if self._pending.pop(request_id, None) is not None:
                self._abandoned.add(request_id)  # sent: if it starts, it is killed at once
            elif reply.done() and not reply.cancelled():
                self._discard(reply.result())
            for fd in ours:
                os.close(fd)
            raise
        if "pid" not in answer:
            for fd in ours:
                os.close(fd)
            raise OSError(answer["errno"], answer["error"])
        return Spawned(answer["pid"], out_r, err_r, in_w, answer["exit_future"])

    def close(self) -> None:
        """Close our end: the spawner kills what is left of its commands and exits."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.dead = True

    async def wait_closed(self, timeout: float) -> None:
        """Wait for the process to exit; kill it if it has not within ``timeout``."""
        if self._gone is None or self._transport is None:
            return
        try:
            await asyncio.wait_for(self._gone.wait(), timeout)
        except TimeoutError:
            if self._transport is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._transport.kill()
            await self._gone.wait()

    # -- internals -----------------------------------------------------------------

    async def _send(self, body: bytes, fds: list[int]) -> bool:
        """Send a request; False if it is too large for the socket."""
        assert self._loop is not None
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        while True:
            if self._sock is None:
                raise SpawnerUnavailable("the command spawner has exited")
            try:
                self._sock.sendmsg([body], ancillary)
                return True
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(self._sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    if self._sock is not None:
                        self._loop.remove_writer(self._sock.fileno())
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    return False
                self._lost(f"unreachable ({exc.strerror})")
                raise SpawnerUnavailable("the command spawner has exited") from exc

    def _readable(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost("closed its socket")
                return
            self._on_message(json.loads(data))

    def _on_message(self, message: dict[str, Any]) -> None:
        assert self._loop is not None
        if "ready" in message:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if "exit" in message:
            done = self._exits.pop(message["exit"], None)
            if done is not None and not done.done():
                done.set_result(message["code"])
            self._retire_if_idle()
            return
        request_id = message["id"]
        if "pid" in message:
            # Made now: the exit may come in the same read, before the requester resumes.
            message["exit_future"] = self._exits[message["pid"]] = self._loop.create_future()
            if self.retire_after is not None and message["cpu"] > self.retire_after:
                self.draining = True
        if request_id in self._abandoned:
            self._abandoned.discard(request_id)
            self._discard(message)
            return
        reply = self._pending.pop(request_id, None)
        if reply is not None and not reply.done():
            reply.set_result(message)

    def _discard(self, answer: dict[str, Any]) -> None:
        # A command whose caller left before it knew the pid: nobody will read it.
        pid = answer.get("pid")
        if pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            done: asyncio.Future[int] = answer["exit_future"]
            done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _retire_if_idle(self) -> None:
        if self.draining and not self._exits and not self._pending:
            self.close()

    def _lost(self, how: str) -> None:
        if self._transport is not None and self._transport.get_returncode() is not None:
            self._transport.close()
            if self._gone is not None:
                self._gone.set()
        if self.dead and not self._pending and not self._exits:
            return
        if not self.dead:
            logger.warning("command spawner %d %s", self.pid, how)
        self.close()
        error = ProcessDied(f"the command spawner (pid {self.pid}) {how}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(OSError(0, f"the command spawner {how} while starting"))
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(error)
        for done in self._exits.values():
            if not done.done():
                done.set_exception(error)
        self._pending.clear()
        self._exits.clear()


class Spawners:
    """The spawners of one worker, one per set of limits, started on first use."""

    def __init__(self) -> None:
        self._current: dict[str, Spawner] = {}
        # A start is a task of its own: a caller that leaves does not abort it for the rest.
        self._starting: dict[str, asyncio.Task[Spawner]] = {}
        self._all: set[Spawner] = set()
        self._closed = False

    async def get(self, limits: str, cpu_seconds: int | None) -> Spawner:
        """A spawner holding ``limits`` (``AS=soft:hard,...``); raise OSError if none starts."""
        current = self._current.get(limits)
        if current is not None and current.usable:
            return current
        starting = self._starting.get(limits)
        if starting is None:
            if self._closed:
                raise ShuttingDown("the worker is shutting down")
            self._all = {s for s in self._all if not s.gone}
            spawner = Spawner(limits, cpu_seconds)
            self._all.add(spawner)
            starting = asyncio.create_task(self._start(limits, spawner, current))
            starting.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._starting[limits] = starting
        return await asyncio.shield(starting)

    async def _start(self, limits: str, spawner: Spawner, previous: Spawner | None) -> Spawner:
        try:
            await spawner.start()
        finally:
            del self._starting[limits]
        self._current[limits] = spawner
        if previous is not None:
            previous._retire_if_idle()
        return spawner

    def pids(self) -> list[int]:
        """Spawner processes still running."""
        return [s.pid for s in self._all if s.pid and not s.gone]

    async def close(self, timeout: float = 5.0) -> None:
        """Close every spawner and wait for them to exit."""
        self._closed = True
        starting = list(self._starting.values())
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        spawners = list(self._all)
        for spawner in spawners:
            spawner.close()
        await asyncio.gather(*(s.wait_closed(timeout) for s in spawners))
        self._all.clear()
        self._current.clear()
