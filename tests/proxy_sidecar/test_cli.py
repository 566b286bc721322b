"""``shoal sidecar`` as a real process: ready line, admin, clean stop, one-line errors."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import urllib.request
from typing import Any

import grpc

from tests.proxy_sidecar.conftest import wait_for
from tests.proxy_sidecar.upstream import SERVICE

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


async def _run(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *SHOAL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_sidecar_process_serves_registers_and_stops(registry, upstreams):
    app = upstreams[0]
    proc = await asyncio.create_subprocess_exec(
        *SHOAL,
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        registry.address,
        "--service",
        "echo",
        "--app",
        app.address,
        "--inbound",
        "127.0.0.1:0",
        "--grpc-service",
        SERVICE,
        "--admin",
        "127.0.0.1:0",
        "--lb",
        "least_request",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.match(
            r"shoal sidecar serving on (\S+) \(inbound on (\S+)\) \(admin on port (\d+)\)", line
        )
        assert match, line
        address, admin = match.group(1), int(match.group(3))
        channel: Any
        async with grpc.aio.insecure_channel(address) as channel:
            echo = channel.unary_unary(f"/{SERVICE}/Unary")

            async def answered():
                try:
                    return await echo(b"hi", timeout=20) == b"up0:hi"
                except grpc.aio.AioRpcError:
                    return False  # its own registration is still on its way back

            await wait_for(answered, what="a call through the sidecar process")

        def healthz():
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=10) as r:
                return json.loads(r.read())

        assert (await asyncio.to_thread(healthz))["app_registered"] is True
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert registry.store.instances() == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_user_errors_are_one_line(registry, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lb: round_robin\noutlier:\n  consecutive_failures: zero\n")
    cases = [
        (["--lb", "fastest"], "unknown load balancer 'fastest'"),
        (["--service", "echo"], "--service and --app go together"),
        (["--config", str(bad)], "line 3: outlier.consecutive_failures"),
        (["--config", str(tmp_path / "missing.yaml")], "cannot read file"),
        (["--registry", "nohost"], "must be host:port"),
        (["--grpc-service", "not a name"], "not a gRPC service name"),
    ]
    for args, expected in cases:
        code, out, err = (
            await _run("sidecar", "--listen", "127.0.0.1:0", "--registry", registry.address, *args)
            if "--registry" not in args
            else await _run("sidecar", "--listen", "127.0.0.1:0", *args)
        )
        assert code == 2, (args, err)
        assert err.startswith("shoal: error:") and expected in err, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err
