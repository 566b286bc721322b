"""One mesh, two kinds of caller at once: apps behind a client sidecar, and plain
grpcio clients with ``xds:///echo`` and no sidecar, both reaching the same upstreams
through each upstream's own sidecar (which keeps enforcing what it enforces)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from registry_service import RegistryServer
from shoal_cli.xds_cmd import bootstrap_document
from tests.proxy_sidecar.conftest import Mesh, served_by
from tests.proxy_sidecar.upstream import SERVICE

CALLS = 60
# Plain grpcio, nothing of Shoal's: who served each of CALLS calls of xds:///echo.
CLIENT = f"""
import grpc, sys
with grpc.insecure_channel("xds:///echo") as channel:
    unary = channel.unary_unary("/{SERVICE}/Unary", None, None)
    for _ in range({CALLS}):
        _, call = unary.with_call(b"hi", timeout=10, wait_for_ready=True)
        print(dict(call.initial_metadata())["x-served-by"], flush=True)
"""


async def test_one_mesh_serves_sidecar_users_and_proxyless_clients_at_once(
    make_mesh: Callable[..., Awaitable[Mesh]], registry: RegistryServer, tmp_path: Path
) -> None:
    mesh = await make_mesh()
    bootstrap = tmp_path / "xds.json"
    bootstrap.write_text(json.dumps(bootstrap_document([registry.address], "app-1", "", "")))
    proxyless = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
    )  # fmt: skip

    async def through_the_client_sidecar() -> list[str]:
        served = []
        for _ in range(CALLS):
            call = mesh.echo.unary(b"hi", timeout=10)
            served.append(await served_by(call))
            await call
        return served

    try:
        (out, err), by_sidecar = await asyncio.wait_for(
            asyncio.gather(proxyless.communicate(), through_the_client_sidecar()), 60
        )
    finally:
        if proxyless.returncode is None:
            proxyless.kill()
            await proxyless.wait()
    assert proxyless.returncode == 0, err.decode()[-2000:]
    by_proxyless = out.decode().split()
    upstreams = {u.name for u in mesh.upstreams}
    assert len(by_proxyless) == CALLS and set(by_proxyless) == upstreams, by_proxyless
    assert set(by_sidecar) == upstreams, by_sidecar
    # Each upstream's own sidecar carried both kinds of call to it.
    assert sum(u.total for u in mesh.upstreams) >= 2 * CALLS
