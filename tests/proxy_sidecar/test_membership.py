"""Bringing an app into the mesh: register, health, re-register on NOT_FOUND, drain."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar import SidecarConfig, SidecarServer
from registry_service import RegistryServer
from tests.proxy_sidecar.conftest import FAST_REGISTRY, healthz, sidecar_config, wait_for
from tests.proxy_sidecar.upstream import OTHER, SERVICE


async def _discover(registry, include_unhealthy=False):
    async with grpc.aio.insecure_channel(registry.address) as channel:
        reply = await pb_grpc.RegistryStub(channel).Discover(
            pb.DiscoverRequest(service="echo", include_unhealthy=include_unhealthy)
        )
    return list(reply.instances)


async def test_register_health_reregister_and_drain(registry, upstreams):
    app = upstreams[0]
    # No grpc_services in the settings: they come from the app's reflection.
    async with SidecarServer(
        "127.0.0.1:0",
        registry.address,
        SidecarConfig.model_validate({"membership": {"ttl": 1.5}}),
        service="echo",
        app=app.address,
        inbound="127.0.0.1:0",
    ) as sidecar:
        await wait_for(lambda: registry.store.instances(), what="registration")
        (inst,) = await _discover(registry)
        assert inst.address == sidecar.inbound_address
        assert set(inst.grpc_services) == {SERVICE, OTHER}
        assert sidecar.membership is not None

        await app.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

        async def not_serving():
            found = await _discover(registry, include_unhealthy=True)
            return bool(found) and found[0].status == pb.NOT_SERVING

        await wait_for(not_serving, what="NOT_SERVING to reach the registry")
        await app.health.set("", health_pb2.HealthCheckResponse.SERVING)

        async def serving():
            found = await _discover(registry)
            return len(found) == 1

        await wait_for(serving, what="SERVING again")

        # The registry forgets the lease (as after a restart): the sidecar registers again.
        membership = sidecar.membership
        first = membership.registrations
        registry.store.deregister(sidecar.membership.lease_id)
        await wait_for(lambda: membership.registrations > first, what="re-registration")
        await wait_for(lambda: len(registry.store.instances()) == 1)
    # Closing deregisters at once, long before the lease would lapse.
    assert registry.store.instances() == []


async def test_inbound_load_is_reported(make_mesh, registry):
    mesh = await make_mesh(sidecar_config())
    call = mesh.echo.server_stream(b"200,0.05")
    await call.read()
    await wait_for(
        lambda: any(i.load.in_flight >= 1 for i in registry.store.instances()),
        what="an in-flight load report",
    )
    call.cancel()


def _said(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_failing_heartbeats_warn_once_and_recovery_is_said_once(upstreams, caplog):
    caplog.set_level(logging.DEBUG, logger="proxy_sidecar.membership")
    registry = RegistryServer("127.0.0.1:0", FAST_REGISTRY)
    await registry.start()
    address = registry.address
    async with SidecarServer(
        "127.0.0.1:0",
        address,
        sidecar_config(),
        service="echo",
        app=upstreams[0].address,
        inbound="127.0.0.1:0",
    ) as sidecar:
        membership = sidecar.membership
        assert membership is not None
        await wait_for(lambda: membership.heartbeats >= 1, what="a heartbeat")
        await registry.close(grace=0)
        # Lease 1.5 s, a heartbeat every 0.5 s: a WARNING after three failed intervals.
        await wait_for(lambda: _said(caplog, "have failed for"), what="the WARNING")
        await asyncio.sleep(2.0)  # more failures follow; none of them is said again
        (warning,) = _said(caplog, "have failed for")
        assert warning.levelno == logging.WARNING
        assert address in warning.getMessage()
        assert not _said(caplog, "recovered")

        # The registry comes back (empty): its NOT_FOUND is an answer, so heartbeats recovered.
        registry = RegistryServer(address, FAST_REGISTRY)
        await registry.start()
        try:
            await wait_for(lambda: registry.store.instances(), what="registering again")
            await asyncio.sleep(1.5)  # heartbeats go on
            (recovered,) = _said(caplog, "recovered")
            assert recovered.levelno == logging.INFO
            assert len(_said(caplog, "have failed for")) == 1
        finally:
            await registry.close(grace=0)


async def test_healthz_fails_while_the_app_is_not_serving_or_unreachable(registry, upstreams):
    app = upstreams[0]
    async with SidecarServer(
        "127.0.0.1:0",
        registry.address,
        sidecar_config(),
        service="echo",
        app=app.address,
        inbound="127.0.0.1:0",
        admin="127.0.0.1:0",
    ) as sidecar:
        port = sidecar.admin_port
        status, body = await healthz(port)
        assert (status, body["status"], body["app_reachable"]) == (200, "serving", True)

        async def says(expected: int, text: str) -> bool:
            status, body = await healthz(port)
            return (status, body["status"]) == (expected, text)

        await app.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await wait_for(lambda: says(503, "app not serving"), what="healthz to see NOT_SERVING")
        await app.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await wait_for(lambda: says(200, "serving"), what="healthz to recover")
        await app.stop()

        await wait_for(lambda: says(503, "app unreachable"), what="healthz to fail")
        _, body = await healthz(port)
        assert body["app_reachable"] is False
        # And the heartbeats tell the registry the instance is not serving.
        assert sidecar.membership is not None and sidecar.membership.status == pb.NOT_SERVING
