"""Every ``/metrics`` page passes ``promtool check metrics``, after real calls.

Real servers on 127.0.0.1:0 (a registry, a worker, an identity server, a client
sidecar and the sidecar in front of an app), a few calls through each, then each page
is scraped over HTTP and piped to Debian's ``promtool``: it must exit 0 and print
nothing (it prints its lint problems, such as a counter without ``_total`` or a
``quantile`` label on a gauge, and still exits 0 for some of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from identity.ca import init_ca
from identity.spiffe import SpiffeId
from identity.tokens import create_token
from identity.workload import new_request
from identity_service.server import IdentityServer
from protos import identity_pb2, identity_pb2_grpc
from protos import registry_pb2 as reg_pb
from protos import registry_pb2_grpc as reg_grpc
from protos import worker_pb2 as worker_pb
from protos import worker_pb2_grpc as worker_grpc
from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from shoal_core.metrics import Histogram
from shoal_core.tls import bootstrap_credentials, target_options
from shoal_core.tracing import TraceSettings
from tests.otlp_receiver import OtlpReceiver
from tests.proxy_sidecar.conftest import (
    FAST_REGISTRY,
    Echo,
    routable,
    sidecar_config,
    wait_for,
)
from tests.proxy_sidecar.upstream import Upstream
from tests.registry_service.conftest import instance
from tests.worker_node.conftest import config as worker_config
from worker_node import WorkerServer

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is missing: install it with 'apt-get install prometheus' (Debian), "
    "or scripts/test does it as root",
)


def promtool(page: bytes) -> tuple[int, str]:
    """``promtool check metrics`` on ``page``: its exit status and all that it printed."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=page, capture_output=True, timeout=60, check=False
    )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


async def scrape(port: int) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            assert page.status == 200
            body: bytes = page.read()
            return body

    return await asyncio.to_thread(get)


def assert_clean(page: bytes) -> None:
    code, said = promtool(page)
    assert (code, said) == (0, ""), f"promtool check metrics (exit {code}):\n{said}"


@needs_promtool
async def test_the_registrys_metrics_pass_promtool() -> None:
    async with (
        RegistryServer("127.0.0.1:0", metrics_listen="127.0.0.1:0") as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = reg_grpc.RegistryStub(channel)
        lease = await stub.Register(reg_pb.RegisterRequest(instance=instance(1)))
        await stub.Register(reg_pb.RegisterRequest(instance=instance(2)))
        await stub.Heartbeat(
            reg_pb.HeartbeatRequest(lease_id=lease.lease_id, status=reg_pb.SERVING)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Heartbeat(reg_pb.HeartbeatRequest(lease_id="nobody"))
        await stub.Discover(reg_pb.DiscoverRequest(service="echo"))
        await stub.Deregister(reg_pb.DeregisterRequest(lease_id=lease.lease_id))
        page = await scrape(server.metrics_port)
    assert b"shoal_registry_registrations_total 2.0" in page
    assert_clean(page)


@needs_promtool
async def test_the_workers_metrics_pass_promtool_with_a_histogram_per_method_and_outcome() -> None:
    async with (
        WorkerServer("127.0.0.1:0", worker_config(), metrics_listen="127.0.0.1:0") as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = worker_grpc.WorkerStub(channel)
        await stub.Echo(worker_pb.EchoRequest(payload=b"x"))
        for _ in range(3):
            await stub.Call(worker_pb.CallRequest(function="upper", payload=b"a"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Call(worker_pb.CallRequest(function="crash"))
        page = await scrape(server.metrics_port)
    text = page.decode()
    assert 'shoal_worker_requests_total{method="Call",outcome="ok"} 3.0' in text
    assert 'shoal_worker_requests_total{method="Call",outcome="failed"} 1.0' in text
    assert 'shoal_worker_requests_total{method="Echo",outcome="ok"} 1.0' in text
    duration = "shoal_worker_request_duration_seconds"
    assert f'{duration}_bucket{{le="+Inf",method="Call",outcome="ok"}} 3.0' in text
    assert f'{duration}_count{{method="Call",outcome="failed"}} 1.0' in text
    bounds = [line for line in text.splitlines() if line.startswith(f"{duration}_bucket")]
    assert len(bounds) == 2 * (16 + 1)  # ok and failed, the 16 bounds and +Inf
    assert "quantile" not in text
    assert_clean(page)


@needs_promtool
async def test_the_identity_servers_metrics_pass_promtool(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", "shoal.local")
    async with IdentityServer(
        "127.0.0.1:0", ca, leaf_ttl=dt.timedelta(minutes=5), metrics_listen="127.0.0.1:0"
    ) as server:
        options = target_options(SpiffeId("shoal.local", "identity"))
        async with grpc.aio.secure_channel(
            server.address, bootstrap_credentials(ca.bundle_pem), options=options
        ) as channel:
            stub = identity_pb2_grpc.IdentityStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Certify(identity_pb2.CertifyRequest(csr_pem=b"not a csr"), timeout=5)
            token, _ = create_token(ca, "worker", dt.timedelta(minutes=5))
            _, csr = new_request()
            await stub.Certify(identity_pb2.CertifyRequest(csr_pem=csr, token=token), timeout=5)
        page = await scrape(server.metrics_port)
    assert_clean(page)
    text = page.decode()
    assert 'shoal_identity_certificates_issued_total{kind="svc",proof="token"} 1.0' in text
    assert 'shoal_identity_certify_refused_total{code="UNAUTHENTICATED",proof="token"} 1.0' in text
    assert "shoal_identity_trust_bundle_roots 1.0" in text


@contextlib.asynccontextmanager
async def sidecars() -> AsyncIterator[tuple[SidecarServer, SidecarServer]]:
    """A client sidecar (tracing every call) and the sidecar of one app, both with an
    admin page."""
    async with contextlib.AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(OtlpReceiver())
        trace = TraceSettings(endpoint=receiver.endpoint, service="sidecar", sample=1.0)
        registry = await stack.enter_async_context(RegistryServer("127.0.0.1:0", FAST_REGISTRY))
        app = await stack.enter_async_context(Upstream("up0"))
        inbound = SidecarServer(
            "127.0.0.1:0",
            registry.address,
            sidecar_config(),
            service="echo",
            app=app.address,
            inbound="127.0.0.1:0",
            admin="127.0.0.1:0",
        )
        await stack.enter_async_context(inbound)
        client = SidecarServer(
            "127.0.0.1:0", registry.address, sidecar_config(), admin="127.0.0.1:0", trace=trace
        )
        await stack.enter_async_context(client)
        await wait_for(lambda: routable(client) == 1, what="the app routable")
        yield client, inbound


@needs_promtool
async def test_the_sidecars_admin_metrics_pass_promtool() -> None:
    async with sidecars() as (client, inbound):
        async with grpc.aio.insecure_channel(client.address) as channel:
            echo = Echo(channel)
            for i in range(3):
                await echo.unary(b"%d" % i)
        await asyncio.sleep(0.2)  # a call's end reaches the counters just after its answer
        pages = {
            name: await scrape(s.admin_port)
            for name, s in (("client", client), ("inbound", inbound))
        }
    for family in (b"request_bytes_total", b"response_bytes_total", b"spans_total"):
        assert b"shoal_sidecar_" + family in pages["client"]
    for name, page in pages.items():
        code, said = promtool(page)
        assert (code, said) == (0, ""), f"{name} sidecar: promtool (exit {code}):\n{said}"


def test_a_histogram_counts_each_value_in_the_first_bucket_at_least_as_large() -> None:
    hist = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.01, 5.0):
        hist.observe(value)
    assert hist.cumulative() == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]
    assert hist.count == 5 and hist.sum == pytest.approx(5.0135)
    with pytest.raises(ValueError, match="increase"):
        Histogram((0.01, 0.001))
