"""Bounded Echo load from inside the client pod, with per-instance counts from the admin page."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from identity.spiffe import SpiffeId
from identity.workload import Credentials
from protos import registry_pb2 as rpb
from protos import registry_pb2_grpc as rpb_grpc
from shoal_core.tls import channel_credentials, target_options

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryStub

SERVICE = "shoal.worker.v1.Worker"

# Runs in the client app's container, which shares its sidecar's network namespace: the
# sidecar's app-facing listener is on that loopback only, so the load cannot come from
# the host. One line per call on stdout; stdin closing is the signal to stop.
_CALLERS = """
import asyncio, sys, threading, time
import grpc
from protos import worker_pb2 as wpb, worker_pb2_grpc as wpb_grpc

async def main(address, callers, limit):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    def until_eof():
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=until_eof, daemon=True).start()
    deadline = time.monotonic() + limit
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wpb_grpc.WorkerStub(channel)
        async def caller():
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    await stub.Echo(wpb.EchoRequest(payload=b"e2e"), timeout=10)
                    print("ok", flush=True)
                except grpc.aio.AioRpcError as exc:
                    said = f"{exc.code().name}: {exc.details()}".replace(chr(10), " ")
                    print("failed", said, flush=True)
                await asyncio.sleep(0.01)
        await asyncio.gather(*(caller() for _ in range(callers)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


class Load:
    """Echo calls from a few concurrent callers in ``container`` (the client app's) to
    its sidecar on 127.0.0.1:7701, until stopped (or a hard time limit)."""

    def __init__(self, container: str, *, callers: int = 4, limit: float = 120.0) -> None:
        self._container = container
        self._callers = callers
        self._limit = limit
        self.ok = 0
        self.failed: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._proc = await asyncio.create_subprocess_exec(
            *("docker", "exec", "-i", self._container, "python", "-u", "-c", _CALLERS),
            *("127.0.0.1:7701", str(self._callers), str(self._limit)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._task = asyncio.create_task(self._read(self._proc))
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc, task = self._proc, self._task
        if proc is None or task is None:
            return
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()  # the callers finish the calls they are in, then exit
        try:
            await asyncio.wait_for(task, 60)
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("the load in the client pod did not stop") from None
        if code != 0:
            said = (await proc.stderr.read()).decode(errors="replace")[-2000:]
            self.failed.append(f"the load process exited {code}: {said}")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line == "ok":
                self.ok += 1
            else:
                self.failed.append(line.removeprefix("failed "))


def served(admin: str) -> dict[str, int]:
    """Requests the client sidecar has sent to each worker instance, by instance id."""
    with urllib.request.urlopen(f"http://{admin}/endpoints", timeout=5) as page:
        data = json.load(page)
    endpoints = data["services"].get(SERVICE, {}).get("endpoints", [])
    return {e["instance_id"]: int(e.get("requests") or 0) for e in endpoints}


def healthy_workers(registry: str, operator: Credentials) -> set[str]:
    """The worker instances ``registry`` routes to, asked over mTLS as ``operator``."""
    expected = SpiffeId(operator.identity.trust_domain, "registry")
    with grpc.secure_channel(
        registry, channel_credentials(operator), options=target_options(expected)
    ) as channel:
        stub: RegistryStub = rpb_grpc.RegistryStub(channel)
        found = stub.Discover(rpb.DiscoverRequest(service="worker"), timeout=5)
    return {i.instance_id for i in found.instances}


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` (run in a thread) until true; return how long it took."""
    started = time.monotonic()
    while True:
        try:
            if await asyncio.to_thread(check):
                return time.monotonic() - started
        except (OSError, grpc.RpcError):
            pass  # not up yet
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.2)
