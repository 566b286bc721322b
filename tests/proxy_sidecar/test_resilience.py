"""Failures the client must not see: dead instances, outliers, a stopped registry."""

from __future__ import annotations

import asyncio
import sys

import grpc

from tests.proxy_sidecar.conftest import routable, served_by, sidecar_config, wait_for
from tests.proxy_sidecar.upstream import SERVICE, Upstream


async def test_outlier_is_ejected_and_returns_after_recovery(make_mesh):
    mesh = await make_mesh(sidecar_config(lb="round_robin", outlier={"base_ejection": 1.0}))
    bad = mesh.by_name("up1")
    bad.fail_with = grpc.StatusCode.UNAVAILABLE
    for i in range(30):
        # Every call succeeds: the failed tries are retried on another instance.
        await mesh.echo.unary(b"%d" % i)
    cluster = mesh.client.router.cluster(SERVICE)
    failing = _endpoint_of(mesh, bad)
    # The failing instance was ejected (it may be back on probation by now), and only it.
    assert cluster.outlier.ejections(failing) >= 1
    others = [e for e in cluster.members() if e is not failing]
    assert len(others) == 2
    assert all(cluster.outlier.ejections(e) == 0 for e in others)
    bad.fail_with = None
    served_before = bad.total

    async def back_in_rotation():
        await mesh.echo.unary(b"y")
        return bad.total > served_before + 2

    await wait_for(back_in_rotation, what="the recovered instance to serve again")


def _endpoint_of(mesh, upstream):
    sidecar = mesh.sidecars[mesh.upstreams.index(upstream)]
    return next(e for e in mesh.client.table.endpoints() if e.address == sidecar.inbound_address)


async def test_calls_keep_flowing_with_the_registry_stopped(make_mesh, registry):
    mesh = await make_mesh()
    await registry.close(grace=0)
    await wait_for(lambda: not mesh.client.discovery.connected, what="the watch to break")
    served = set()
    for i in range(30):
        call = mesh.echo.unary(b"%d" % i)
        await call
        served.add(await served_by(call))
    assert served == {"up0", "up1", "up2"}
    assert routable(mesh.client) == 3


async def test_kill_9_of_an_upstream_loses_no_call(registry, upstreams):
    from tests.proxy_sidecar.conftest import Mesh

    procs = []
    real = []
    try:
        for name in ("p0", "p1", "p2"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.proxy_sidecar.upstream",
                name,
                stdout=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            port = int(line.rsplit(":", 1)[1])
            stub = Upstream(name)
            stub.port = port
            real.append(stub)
        mesh = Mesh(registry, real)
        await mesh.start(sidecar_config(lb="round_robin"))
        try:
            failures: list[BaseException] = []
            served: list[str] = []
            stop = asyncio.Event()

            async def steady():
                while not stop.is_set():
                    try:
                        call = mesh.echo.unary(b"ping", timeout=10)
                        await call
                        served.append(await served_by(call))
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc)

            workers = [asyncio.create_task(steady()) for _ in range(4)]
            await wait_for(lambda: len(served) > 50, what="steady traffic")
            procs[1].kill()
            await procs[1].wait()
            killed_at = len(served)
            await wait_for(lambda: len(served) > killed_at + 200, what="traffic after the kill")
            stop.set()
            await asyncio.gather(*workers)
            assert failures == []
            assert "p1" not in served[killed_at + 50 :]
        finally:
            await mesh.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_client_cancel_reaches_upstream(make_mesh):
    mesh = await make_mesh()
    call = mesh.echo.server_stream(b"1000,0.05")
    first = await call.read()
    name = first.split(b":")[0].decode()
    call.cancel()
    upstream = mesh.by_name(name)
    await wait_for(lambda: upstream.cancelled >= 1, what="the upstream to see the cancel")


async def test_circuit_breaker_fails_fast(make_mesh):
    config = sidecar_config(defaults={"circuit_breaker": {"max_in_flight": 2, "max_pending": 1}})
    mesh = await make_mesh(config)
    calls = [mesh.echo.unary(b"x", metadata=[("x-sleep", "1")]) for _ in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(rejected) == 3
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected)
    assert "circuit breaker" in str(rejected[0].details())
