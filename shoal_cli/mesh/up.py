"""``shoal up``: start a whole mesh on loopback, show it, supervise it, stop it in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from protos import registry_pb2 as rpb
from protos import registry_pb2_grpc as rpb_grpc
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from shoal_cli.mesh.plan import WORKER_SERVICE, MeshPlan
from shoal_cli.mesh.supervisor import Child, Supervisor
from shoal_cli.operator import registry_channel

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub
    from protos.worker_pb2_grpc import WorkerAsyncStub

__all__ = ["MeshNotReady", "RunningMesh", "run_mesh"]

logger = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
# SIGHUP too: the terminal (a tmux pane, an ssh session) went away with the mesh on it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class MeshNotReady(RuntimeError):
    """The mesh started but did not become healthy in time."""


class RunningMesh:
    """The started children of a plan, by role."""

    def __init__(self, plan: MeshPlan, supervisor: Supervisor) -> None:
        self.plan = plan
        self.supervisor = supervisor
        self.by_name: dict[str, Child] = {}

    async def start(self) -> None:
        for spec in self.plan.start_order():
            self.by_name[spec.name] = await self.supervisor.start(spec)

    async def stop(self) -> None:
        """The client side first, then sidecars (they drain and deregister), workers,
        the dashboard, the registry."""
        plan = self.plan
        # The dashboard after the workers: it receives their last spans as they stop.
        groups = [[plan.client], plan.sidecars, plan.workers, [plan.dashboard], [plan.registry]]
        if plan.identity is not None:
            groups.append([plan.identity])
        await self.supervisor.stop(
            [
                [self.by_name[spec.name] for spec in group if spec.name in self.by_name]
                for group in groups
            ]
        )

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every worker is registered and healthy and a call through the client works."""
        deadline = time.monotonic() + timeout
        want = len(self.plan.workers)
        async with (
            registry_channel(
                self.plan.registry_address,
                None if self.plan.trust is None else self.plan.trust.operator(),
            ) as reg_channel,
            grpc.aio.insecure_channel(self.plan.client_address) as client_channel,
        ):
            registry: RegistryAsyncStub = rpb_grpc.RegistryStub(reg_channel)
            worker: WorkerAsyncStub = wpb_grpc.WorkerStub(client_channel)
            healthy = 0
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    found = await registry.Discover(
                        rpb.DiscoverRequest(service=WORKER_SERVICE), timeout=2
                    )
                    healthy = len(found.instances)
                    if healthy >= want:
                        await worker.Echo(wpb.EchoRequest(payload=b"ready"), timeout=2)
                        return
                await asyncio.sleep(0.2)
        raise MeshNotReady(
            f"only {healthy} of {want} workers became healthy within {timeout:g}s; "
            f"see the logs in {self.supervisor.log_dir}"
        )


async def run_mesh(
    plan: MeshPlan,
    log_dir: Path,
    *,
    on_event: Callable[[str], None],
    on_ready: Callable[[RunningMesh], None],
    while_running: Callable[[RunningMesh], asyncio.Future[None] | None] | None = None,
) -> None:
    """Start the mesh, call ``on_ready``, supervise until a signal, then stop it in order.

    A second signal while stopping kills every child at once. Stopping never waits on
    printing: the signal is acted on before ``on_event`` is told, and a callback or
    ``while_running`` that fails (say, writing to a pipe nobody reads) is logged and
    the mesh is stopped all the same.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    supervisor = Supervisor(log_dir, on_event)

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals == 1:
            supervisor.tell("stopping the mesh (again to force) ...")
        else:
            supervisor.kill_all()

    mesh = RunningMesh(plan, supervisor)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    extra: asyncio.Future[None] | None = None
    try:
        starting = asyncio.ensure_future(_start(mesh))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()
        on_ready(mesh)
        if while_running is not None:
            extra = while_running(mesh)
        await stopped
    finally:
        if extra is not None:
            await _cancel(extra)
        try:
            await mesh.stop()
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)


async def _cancel(extra: asyncio.Future[None]) -> None:
    """Cancel what ran beside the mesh; however it ended, the mesh is stopped next."""
    extra.cancel()
    try:
        await extra
    except asyncio.CancelledError:
        pass
    except Exception:
        logger.exception("what ran beside the mesh failed; stopping the mesh anyway")


async def _start(mesh: RunningMesh) -> None:
    await mesh.start()
    await mesh.wait_ready()
