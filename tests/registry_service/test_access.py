"""The registry over mTLS: a rogue process cannot hijack, remove or read the mesh.

Every attack uses real TLS against a real registry: no certificate, another CA's,
an expired one, and a valid one for the wrong service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable

import grpc
import pytest

from identity.ca import init_ca
from identity.spiffe import SpiffeId
from identity.workload import Credentials
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryConfig, RegistryServer
from shoal_core.tls import channel_credentials, server_credentials, target_options
from tests.mesh_identity import TD, credentials
from tests.registry_service.conftest import instance

REGISTRY = SpiffeId(TD, "registry")


@pytest.fixture
def ca(tmp_path):
    return init_ca(tmp_path / "ca", TD)


@pytest.fixture
async def registry(ca, make_backend):
    own = credentials(ca, REGISTRY)
    config = RegistryConfig()
    server = RegistryServer(
        "127.0.0.1:0",
        config,
        credentials=server_credentials(lambda: own),
        trust_domain=TD,
        backend=make_backend(config),
    )
    async with server:
        yield server


def _channel(registry: RegistryServer, creds: Credentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        registry.address, channel_credentials(creds), options=target_options(REGISTRY)
    )


async def _rpc_code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _registered_worker(registry, ca):
    async with _channel(registry, credentials(ca, "worker")) as channel:
        reply = await pb_grpc.RegistryStub(channel).Register(
            pb.RegisterRequest(instance=instance(1, "worker"), ttl_ms=30_000), timeout=5
        )
    return reply.lease_id


async def test_a_service_registers_renews_and_deregisters_its_own_instances(registry, ca):
    async with _channel(registry, credentials(ca, "worker")) as channel:
        stub = pb_grpc.RegistryStub(channel)
        reply = await stub.Register(pb.RegisterRequest(instance=instance(1, "worker")), timeout=5)
        await stub.Heartbeat(pb.HeartbeatRequest(lease_id=reply.lease_id), timeout=5)
        found = await stub.Discover(pb.DiscoverRequest(service="worker"), timeout=5)
        assert [i.instance_id for i in found.instances] == ["worker-1"]
        await stub.Deregister(pb.DeregisterRequest(lease_id=reply.lease_id), timeout=5)
    assert registry.store.instances() == []


async def test_a_client_certificate_cannot_register_renew_or_remove_a_worker(registry, ca):
    lease = await _registered_worker(registry, ca)
    async with _channel(registry, credentials(ca, "client")) as channel:
        stub = pb_grpc.RegistryStub(channel)
        attempts: dict[str, Awaitable[object]] = {
            "register as worker": stub.Register(
                pb.RegisterRequest(instance=instance(2, "worker")), timeout=5
            ),
            "take the worker's id": stub.Register(
                pb.RegisterRequest(instance=instance(1, "client", instance_id="worker-1")),
                timeout=5,
            ),
            "serve the worker's gRPC service": stub.Register(
                pb.RegisterRequest(instance=instance(3, "client")), timeout=5
            ),
            "register at the worker's address": stub.Register(
                pb.RegisterRequest(
                    instance=instance(
                        4, "client", address="127.0.0.1:10001", grpc_services=["x.Client"]
                    )
                ),
                timeout=5,
            ),
            "renew the worker": stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease), timeout=5),
            "deregister the worker": stub.Deregister(
                pb.DeregisterRequest(lease_id=lease), timeout=5
            ),
        }
        for what, call in attempts.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
            details = caught.value.details() or ""
            assert "svc/client" in details and "'worker'" in details, (what, details)
    # The worker is still the only instance, untouched: no call can be drawn away from it.
    (only,) = registry.store.instances()
    assert (only.spec.instance_id, only.spec.service) == ("worker-1", "worker")
    assert only.spec.address == "127.0.0.1:10001"


async def test_callers_without_a_valid_mesh_certificate_are_refused_at_the_handshake(
    registry, ca, tmp_path
):
    lease = await _registered_worker(registry, ca)
    impostor = credentials(init_ca(tmp_path / "other", TD), "worker")
    expired = credentials(ca, "worker", ttl=dt.timedelta(seconds=1))
    await asyncio.sleep(1.2)
    rogues: dict[str, grpc.aio.Channel] = {
        "no certificate": grpc.aio.secure_channel(
            registry.address,
            grpc.ssl_channel_credentials(ca.bundle_pem),
            options=target_options(REGISTRY),
        ),
        # Trusting our registry, but presenting another CA's worker certificate.
        "another CA": grpc.aio.secure_channel(
            registry.address,
            grpc.ssl_channel_credentials(ca.bundle_pem, impostor.key_pem, impostor.chain_pem),
            options=target_options(REGISTRY),
        ),
        "expired": grpc.aio.secure_channel(
            registry.address, channel_credentials(expired), options=target_options(REGISTRY)
        ),
        "plaintext": grpc.aio.insecure_channel(registry.address),
    }
    for what, channel in rogues.items():
        async with channel:
            stub = pb_grpc.RegistryStub(channel)
            for call in (
                stub.Register(pb.RegisterRequest(instance=instance(3, "worker")), timeout=3),
                stub.Deregister(pb.DeregisterRequest(lease_id=lease), timeout=3),
                stub.Discover(pb.DiscoverRequest(), timeout=3),
            ):
                assert await _rpc_code(call) == grpc.StatusCode.UNAVAILABLE, what
    assert [i.spec.instance_id for i in registry.store.instances()] == ["worker-1"]


async def test_any_mesh_identity_may_read_and_an_operator_may_remove_anything(registry, ca):
    lease = await _registered_worker(registry, ca)
    async with _channel(registry, credentials(ca, "client")) as channel:
        stub = pb_grpc.RegistryStub(channel)
        found = await stub.Discover(pb.DiscoverRequest(service="worker"), timeout=5)
        assert len(found.instances) == 1
        watch = stub.Watch(pb.WatchRequest(service="worker"), timeout=5)
        first = await watch.read()
        assert isinstance(first, pb.WatchEvent)
        assert first.type == pb.WatchEvent.SNAPSHOT and len(first.instances) == 1
        watch.cancel()
    operator = credentials(ca, SpiffeId(TD, "operator", "alice"))
    async with _channel(registry, operator) as channel:
        await pb_grpc.RegistryStub(channel).Deregister(
            pb.DeregisterRequest(lease_id=lease), timeout=5
        )
    assert registry.store.instances() == []


def test_the_rules_without_tls_allow_all_and_with_it_need_this_meshs_service():
    from registry_service.access import Access, PermissionDenied, Unauthenticated

    Access(None).write(None, "register", "worker")  # --insecure: as a plaintext mesh was
    rules = Access(TD)
    with pytest.raises(Unauthenticated):
        rules.read(None)
    with pytest.raises(Unauthenticated, match="other.test"):
        rules.write(SpiffeId.service("other.test", "worker"), "register", "worker")
    with pytest.raises(PermissionDenied, match=r"spiffe://shoal.local/registry may not"):
        rules.write(REGISTRY, "register", "worker")
    rules.write(SpiffeId.service(TD, "worker"), "register", "worker")
    rules.write(SpiffeId(TD, "operator", "ops"), "deregister", "worker")


async def test_xds_is_a_read_any_mesh_identity_may_make(registry, ca):
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from registry_service.xds.resources import ENDPOINTS

    await _registered_worker(registry, ca)
    ask = discovery_pb2.DiscoveryRequest(type_url=ENDPOINTS, resource_names=["worker"])
    async with _channel(registry, credentials(ca, "client")) as channel:
        ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = ads.StreamAggregatedResources(timeout=5)
        await call.write(ask)
        reply = await call.read()
        assert isinstance(reply, discovery_pb2.DiscoveryResponse) and len(reply.resources) == 1
        call.cancel()
    async with grpc.aio.insecure_channel(registry.address) as channel:
        ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = ads.StreamAggregatedResources(timeout=3)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.write(ask)
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
