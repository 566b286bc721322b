"""Bringing an app into the mesh: register, health, re-register on NOT_FOUND, drain."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar import SidecarConfig, SidecarServer
from tests.proxy_sidecar.conftest import sidecar_config, wait_for
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
