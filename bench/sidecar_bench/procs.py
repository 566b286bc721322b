"""The processes a run starts: Shoal's, nginx's and HAProxy's, each reaped on exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc

from .wire import ECHO, SERVICE

__all__ = [
    "PACKAGES",
    "Child",
    "floor",
    "haproxy",
    "missing_tools",
    "nginx",
    "process",
    "registered",
    "shoal",
    "tool",
    "wait_serving",
]

# Tool -> the Debian package that has it.
PACKAGES = {"h2load": "nghttp2-client", "nginx": "nginx", "haproxy": "haproxy"}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # nginx ends a connection after 1000 requests by default; h2load does not reconnect.
    keepalive_requests 100000000;
    # The default 1 MiB would refuse the large-message Echo (413).
    client_max_body_size 0;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream echo {{ server {upstream}; keepalive 64; keepalive_requests 100000000; }}
    server {{
        listen 127.0.0.1:{port} {listen};
        {server}
        location / {{ grpc_pass {scheme}://echo; {location} }}
    }}
}}
"""

# h2 on both sides: `proto h2` on the bind (h2c from the client) and on the server line
# (h2c to the upstream, streams multiplexed); one thread like the sidecar's data plane.
HAPROXY_CONF = """
global
    nbthread 1
    # Each connection takes two descriptors: 4096 stays under the usual 20000 limit.
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend echo
backend echo
    http-reuse always
    server worker {upstream} proto h2 maxconn 4096
"""


@dataclass
class Child:
    """A started process: its pid, the address it serves on, and where its stderr goes."""

    proc: asyncio.subprocess.Process
    address: str
    log: Path
    ready_line: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def why(self) -> str:
        """Whether it exited, and the last line it wrote to stderr: for an error message."""
        lines = self.log.read_text(errors="replace").strip().splitlines()
        said = f"; its stderr ends: {lines[-1][:200]}" if lines else ""
        ended = "" if self.proc.returncode is None else f" (exited {self.proc.returncode})"
        return ended + said


def tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def missing_tools(names: list[str]) -> list[str]:
    return [name for name in names if tool(name) is None]


def _free_port() -> int:
    # Only nginx and HAProxy need a port chosen ahead; Shoal's servers bind port 0 themselves.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def process(
    *args: str, log: Path, ready: str | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[Child]:
    """Run a child process, stderr to ``log``, with ``env`` added to the environment; yield
    it with the address from its ready line; always reap it."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env=None if env is None else {**os.environ, **env},
        )
    child = Child(proc, "", log)
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            match = re.search(ready, line)
            if match is None:
                raise RuntimeError(f"{' '.join(args[:4])} did not start{child.why()}")
            child.address = match.group(1)
            child.ready_line = line
        yield child
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def shoal(log: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[Child]:
    """A ``shoal`` command that prints ``serving on HOST:PORT`` when ready; ``env`` adds
    to its environment (the mTLS settings, which are never flags' values)."""
    cmd = [sys.executable, "-m", "shoal_cli.main", *args, "--log-level", "WARNING"]
    async with process(*cmd, log=log, ready=r"serving on (\S+)", env=env) as child:
        yield child


@contextlib.asynccontextmanager
async def floor(log: Path, upstream: str) -> AsyncIterator[Child]:
    """The sidecar's data plane with a control plane that decides nothing (``floor``)."""
    cmd = [sys.executable, "-m", "bench.sidecar_bench.floor", upstream]
    async with process(*cmd, log=log, ready=r"serving on (\S+)") as child:
        yield child


@contextlib.asynccontextmanager
async def nginx(
    tmp: Path, upstream: str, *, server: str = "", location: str = "", tls_upstream: bool = False
) -> AsyncIterator[Child]:
    """nginx with grpc_pass to ``upstream`` (one worker; the pid is the master's).

    With ``server`` directives, the listener takes TLS (``ssl http2``) and they say how;
    with ``tls_upstream``, ``grpc_pass grpcs://`` and ``location`` says how.
    """
    tmp.mkdir()
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp, upstream=upstream, port=port, listen="ssl http2" if server else "http2",
            server=server, scheme="grpcs" if tls_upstream else "grpc", location=location,
        )
    )  # fmt: skip
    exe = tool("nginx") or "nginx"
    async with process(exe, "-p", str(tmp), "-c", str(conf), log=tmp.with_suffix(".log")) as child:
        child.address = f"127.0.0.1:{port}"
        yield child


@contextlib.asynccontextmanager
async def haproxy(tmp: Path, upstream: str) -> AsyncIterator[Child]:
    """HAProxy in the foreground (``-db``: one process), h2 on both sides."""
    tmp.mkdir()
    port = _free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(upstream=upstream, port=port))
    exe = tool("haproxy") or "haproxy"
    async with process(exe, "-db", "-f", str(conf), log=tmp.with_suffix(".log")) as child:
        child.address = f"127.0.0.1:{port}"
        yield child


@contextlib.asynccontextmanager
async def registered(registry: str, upstream: str) -> AsyncIterator[None]:
    """The worker in the registry by itself (no sidecar of its own), its lease kept alive."""
    channel: Any
    async with grpc.aio.insecure_channel(registry) as channel:
        stub = pb_grpc.RegistryStub(channel)
        reply = await stub.Register(
            pb.RegisterRequest(
                instance=pb.Instance(
                    instance_id="bench-worker", service="bench", address=upstream,
                    grpc_services=[SERVICE],
                ),
                ttl_ms=300_000,
            )
        )  # fmt: skip

        async def beat() -> None:
            # A long --rounds run outlives the 300 s lease the registry grants at most.
            while True:
                await asyncio.sleep(reply.heartbeat_interval_ms / 1000)
                await stub.Heartbeat(
                    pb.HeartbeatRequest(lease_id=reply.lease_id, status=pb.SERVING)
                )

        heartbeats = asyncio.create_task(beat())
        try:
            yield
        finally:
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats


async def wait_serving(address: str, message: bytes) -> None:
    """Until an Echo of ``message`` comes back whole through ``address`` (at most ~10 s)."""
    channel: Any
    async with grpc.aio.insecure_channel(address) as channel:
        echo = channel.unary_unary(ECHO)
        for _ in range(200):
            try:
                if await echo(message, timeout=2) == message:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no echo through {address}")
