"""A pool of warm Python processes: bounded queue, scaling, restarts, timeouts.

Processes are started with ``python -m worker_node.child`` (a fresh interpreter:
never a fork of the worker, whose gRPC state must not be copied), load their
functions, run warm-up calls and only then take tasks. Tasks go to an idle
process first; tasks of functions seen to be tiny are also pipelined behind
other tiny ones (up to ``DEPTH`` per process), which is where the pool's speed on
small tasks comes from. Slow tasks never queue behind anything in a process.
Limits and their watchdogs are ``poollimits``'.

Which processes to start, retire and replace, and when, is decided by the pure
functions in ``policy`` (the restart table is there); this module gathers what
they need and does the I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker_node import policy
from worker_node.config import FunctionConfig, PoolConfig
from worker_node.errors import Overloaded, ProcessDied, ShuttingDown, TaskTimeout, WorkerError
from worker_node.poollimits import PoolLimits
from worker_node.poolproc import PoolProcess, PoolStartError, ProcState, Task, TaskOutcome
from worker_node.protocol import INIT, Status, encode_request

if TYPE_CHECKING:
    from worker_node.tracing import WorkSpans

__all__ = ["DEPTH", "Pool", "PoolCounters", "PoolStartError", "TaskOutcome"]

logger = logging.getLogger(__name__)

DEPTH = 32  # tiny tasks in flight per process
FAST_SECONDS = 0.001  # a function whose mean run time is below this counts as tiny


@dataclass(slots=True)
class PoolCounters:
    """Counters since start."""

    tasks_done: int = 0
    tasks_failed: int = 0
    started: int = 0
    died: int = 0
    restarted: int = 0
    rejected: int = 0


class Pool:
    """Warm processes for the functions assigned to one pool; see the module docstring."""

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        functions: Mapping[str, FunctionConfig],
        *,
        max_result_bytes: int,
    ) -> None:
        self.name = name
        self.config = config
        self.counters = PoolCounters()
        self._index = {fn: i for i, fn in enumerate(functions)}
        self._timeouts = [f.timeout for f in functions.values()]
        self._ewma = [1.0] * len(functions)
        self._seen = [0] * len(functions)
        self._limits = PoolLimits(config.limits, functions)
        spec = {
            "functions": [[n, f.target, f.warmup] for n, f in functions.items()],
            **self._limits.init_spec(),
            "cwd": config.cwd,
            "max_result": max_result_bytes,
        }
        self._init = encode_request(0, INIT, json.dumps(spec).encode())
        # The child must import what this process can: hand it our module search path.
        path = os.pathsep.join(p for p in sys.path if p)
        self._env = {**os.environ, **config.env, "PYTHONPATH": path}
        self._argv = [sys.executable, "-m", "worker_node.child"]
        self._procs: list[PoolProcess] = []
        self._leaving: set[PoolProcess] = set()
        self._starting = 0
        self._queue: collections.deque[Task] = collections.deque()
        self._ids = itertools.count(1)
        self._serials = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._scaler: asyncio.Task[None] | None = None
        self._closing = False
        self._quick_deaths = 0
        self._rng = random.Random()

    # -- public surface --------------------------------------------------------

    @property
    def functions(self) -> list[str]:
        return list(self._index)

    @property
    def size(self) -> int:
        return len(self._procs)

    @property
    def starting(self) -> int:
        return self._starting

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return sum(1 for p in self._procs if p.inflight)

    @property
    def running(self) -> int:
        return sum(1 for p in (*self._procs, *self._leaving) if p.inflight)

    def processes(self) -> list[PoolProcess]:
        return [*self._procs, *self._leaving]

    async def start(self) -> None:
        """Start ``min`` processes and wait until all are warm; raise PoolStartError if not."""
        self._starting += self.config.min
        results = await asyncio.gather(
            *(self._start_one() for _ in range(self.config.min)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.close(0)
            first = failures[0]
            if isinstance(first, PoolStartError):
                raise PoolStartError(f"pool {self.name!r}: {first}") from first
            raise first
        self._scaler = asyncio.create_task(self._scale_down(), name=f"pool-{self.name}-scaler")

    def submit(
        self, function: str, payload: bytes, timeout: float = 0.0, trace: WorkSpans | None = None
    ) -> asyncio.Future[TaskOutcome]:
        """Queue a call; raise ``Overloaded`` at once if the queue is full.

        ``trace``, the call's spans for it, is taken when a process is sent the task and
        done when its future is; the caller ends it if the call is refused.
        """
        if self._closing:
            raise ShuttingDown("the worker is shutting down")
        index = self._index[function]
        limit = self._timeouts[index]
        fut: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()
        if trace is not None:
            fut.add_done_callback(trace.settle)
        fast = self._seen[index] >= 4 and self._ewma[index] < FAST_SECONDS
        task = Task(
            next(self._ids),
            index,
            function,
            payload,
            min(timeout, limit) if timeout > 0 else limit,
            fast,
            fut,
            trace=trace,
        )
        queue = self._queue
        if not queue:
            proc = self._pick(fast)
            if proc is not None:
                proc.send(task)
                return fut
        if len(queue) >= self.config.queue:
            self.counters.rejected += 1
            raise Overloaded(
                f"pool {self.name!r} is at capacity: {len(queue)} tasks queued "
                f"(limit {self.config.queue}) behind {self.size} busy process(es)"
            )
        queue.append(task)
        self._maybe_scale_up()
        return fut

    async def run(
        self, function: str, payload: bytes, timeout: float = 0.0, trace: WorkSpans | None = None
    ) -> TaskOutcome:
        """Submit and wait; a caller that goes away takes its task out of the queue."""
        fut = self.submit(function, payload, timeout, trace)
        try:
            return await fut
        except asyncio.CancelledError:
            # A task already running finishes (bounded by its timeout); its result is dropped.
            for task in self._queue:
                if task.future is fut:
                    self._queue.remove(task)
                    break
            raise

    async def close(self, grace: float) -> None:
        """Stop taking work, let queued and running tasks finish within ``grace``, stop all."""
        self._closing = True
        deadline = time.monotonic() + grace
        while (self._queue or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._fail_all(list(self._queue), ShuttingDown("the worker shut down before this ran"))
        self._queue.clear()
        for task in [*self._background, *([self._scaler] if self._scaler else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        procs = self.processes()
        for proc in procs:
            proc.retire("shutdown")
            if proc.inflight:
                proc.kill("shutdown")
        await self._wait_exited(procs, 3.0)
        for proc in procs:
            proc.kill("shutdown")
        await self._wait_exited(procs, 5.0)
        self._limits.unwatch_all()

    # -- process owner callbacks ---------------------------------------------------

    def task_done(self, proc: PoolProcess, task: Task, outcome: TaskOutcome) -> None:
        i = task.function
        self._ewma[i] = (
            outcome.seconds if not self._seen[i] else (self._ewma[i] * 0.8 + outcome.seconds * 0.2)
        )
        self._seen[i] += 1
        if outcome.status is Status.OK:
            self.counters.tasks_done += 1
        else:
            self.counters.tasks_failed += 1
        if not task.future.done():
            task.future.set_result(outcome)

    def has_capacity(self, proc: PoolProcess) -> None:
        if self._queue:
            self._pump()

    def timed_out(self, proc: PoolProcess, task: Task) -> None:
        self.counters.tasks_failed += 1
        self._set_error(
            task,
            TaskTimeout(
                f"function {task.name!r} ran past its timeout of {task.timeout:g}s; "
                f"its process group (pid {proc.pid}) was killed"
            ),
        )
        self._retire_from_service(proc)

    def exited(self, proc: PoolProcess) -> None:
        self._retire_from_service(proc)
        self._leaving.discard(proc)
        self._limits.unwatch(proc)
        kind = policy.classify_exit(proc.stop_reason, proc.returncode)
        restart = policy.should_restart(self.config.restart, kind, closing=self._closing)
        if kind != "retired":
            self.counters.died += 1
            logger.warning(
                "pool %r: process %d ended (%s, %s); %s",
                self.name,
                proc.pid,
                proc.stop_reason or "unexpected",
                proc.exit_description,
                "restarting" if restart else f"restart policy {self.config.restart}: not replaced",
            )
        lost = [t for t in proc.inflight if not t.future.done()]
        if lost and lost[0] is proc.inflight[0]:
            head = lost.pop(0)
            self.counters.tasks_failed += 1
            if self._closing:
                self._set_error(head, ShuttingDown("the worker shut down before this finished"))
            else:
                why = "a replacement is starting" if restart else "it is not replaced"
                self._set_error(
                    head,
                    ProcessDied(
                        f"pool process {proc.pid} died while running {head.name!r} "
                        f"({proc.exit_description}); {why}"
                    ),
                )
        # Tasks behind the head never started: run them elsewhere.
        self._queue.extendleft(reversed(lost))
        if restart:
            lived = time.monotonic() - proc.started_at
            self._quick_deaths = policy.quick_deaths_after(self._quick_deaths, lived)
            self.counters.restarted += 1
            self._spawn_soon(policy.restart_delay(self._quick_deaths, self._rng))
        self._pump()

    # -- internals -----------------------------------------------------------------

    def _set_error(self, task: Task, error: WorkerError) -> None:
        if not task.future.done():
            task.future.set_exception(error)

    def _fail_all(self, tasks: list[Task], error: WorkerError) -> None:
        for task in tasks:
            self._set_error(task, error)

    def _retire_from_service(self, proc: PoolProcess) -> None:
        if proc in self._procs:
            self._procs.remove(proc)
            if proc.state is not ProcState.DEAD:
                self._leaving.add(proc)

    def _pick(self, fast: bool) -> PoolProcess | None:
        best = None
        best_n = DEPTH
        for proc in self._procs:
            n = len(proc.inflight)
            if n == 0:
                return proc
            if fast and n < best_n and not proc.slow_inflight:
                best, best_n = proc, n
        return best

    def _pump(self) -> None:
        queue = self._queue
        while queue:
            task = queue[0]
            if task.future.done():
                queue.popleft()
                continue
            proc = self._pick(task.fast)
            if proc is None:
                break
            queue.popleft()
            proc.send(task)
        if queue:
            self._maybe_scale_up()

    def _maybe_scale_up(self) -> None:
        if policy.should_scale_up(
            live=len(self._procs),
            starting=self._starting,
            queued=len(self._queue),
            busy=self.busy,
            max_size=self.config.max,
            scale_up_at=self.config.scale_up_at,
            closing=self._closing,
        ):
            self._spawn_soon(0.0)

    def _spawn_soon(self, delay: float) -> None:
        self._starting += 1
        task = asyncio.create_task(self._start_one(delay), name=f"pool-{self.name}-start")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start_one(self, delay: float = 0.0) -> None:
        """Start a process; the caller has already counted it in ``_starting``."""
        proc = PoolProcess(self, next(self._serials))
        try:
            if delay:
                await asyncio.sleep(delay)
            await proc.start(
                self._argv, self._env, self.config.cwd, self._init, self.config.start_timeout
            )
        except PoolStartError as exc:
            if self._scaler is not None:  # a restart or scale-up, not the first start
                logger.error("pool %r: a new process failed to start: %s", self.name, exc)
                return
            raise
        finally:
            self._starting -= 1
        self.counters.started += 1
        if self._closing:
            self._leaving.add(proc)
            proc.retire("shutdown")
            return
        self._procs.append(proc)
        self._limits.watch(proc)
        self._pump()

    async def _scale_down(self) -> None:
        cfg = self.config
        tick = policy.scale_down_tick(cfg.idle_timeout)
        while True:
            await asyncio.sleep(tick)
            retire = policy.idle_to_retire(
                [(p, p.idle_since) for p in self._procs if not p.inflight],
                now=time.monotonic(),
                idle_timeout=cfg.idle_timeout,
                live=len(self._procs),
                min_size=cfg.min,
            )
            for proc in retire:
                logger.info("pool %r: retiring idle process %d", self.name, proc.pid)
                self._retire_from_service(proc)
                proc.retire("retired")

    async def _wait_exited(self, procs: list[PoolProcess], timeout: float) -> None:
        waits = [p.exited.wait() for p in procs if not p.exited.is_set()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
