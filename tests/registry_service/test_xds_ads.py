"""The registry's ADS protocol, spoken by hand with the published envoy stubs:
subscriptions, ACKs, NACKs, pushes, reconnects and limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryServer
from registry_service.xds.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTE
from tests.registry_service.conftest import FAST, StartRegistry, instance

LONG_TTL_MS = 30_000


class Ads:
    """A raw ADS stream, spoken by hand. Replies are read by a task of its own: a read
    that timed out would otherwise cancel the whole call."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for reply in self.call:
                self._replies.put_nowait(reply)
        except grpc.aio.AioRpcError as exc:
            self._replies.put_nowait(exc)

    async def ask(self, type_url: str, names: list[str], **fields: Any) -> None:
        await self.call.write(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id="nack-test"),
                type_url=type_url,
                resource_names=names,
                **fields,
            )
        )

    async def read(self, timeout: float = 2.0) -> discovery_pb2.DiscoveryResponse:
        reply = await asyncio.wait_for(self._replies.get(), timeout)
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, discovery_pb2.DiscoveryResponse), reply
        return reply

    async def silent(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await self.read(seconds)

    async def ended(self) -> None:
        """Wait until the server ends the stream (with any status)."""
        await asyncio.shield(self._reader)

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@pytest.fixture
async def ads_channel(registry: RegistryServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        await pb_grpc.RegistryStub(channel).Register(
            pb.RegisterRequest(instance=instance(1), ttl_ms=LONG_TTL_MS)
        )
        yield channel


async def test_a_nack_is_logged_with_the_node_and_not_answered(
    ads_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    ads = Ads(ads_channel)
    await ads.ask(LISTENER, ["echo"])
    reply = await ads.read()
    assert reply.version_info == "1" and reply.nonce
    listener = listener_pb2.Listener()
    assert reply.resources[0].Unpack(listener) and listener.name == "echo"
    with caplog.at_level(logging.WARNING, logger="registry_service.xds"):
        await ads.ask(
            LISTENER,
            ["echo"],
            response_nonce=reply.nonce,
            error_detail={"code": 3, "message": "no router filter, say"},
        )
        await ads.silent(0.5)
    (record,) = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "nack-test" in record.getMessage() and "no router filter, say" in record.getMessage()
    await ads.close()


async def test_every_type_is_served_acks_are_not_answered_and_changes_are_pushed(
    ads_channel: grpc.aio.Channel,
) -> None:
    ads = Ads(ads_channel)
    kinds = {
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINTS: endpoint_pb2.ClusterLoadAssignment,
    }
    for type_url, kind in kinds.items():
        await ads.ask(type_url, ["echo", "no such name!"])
        reply = await ads.read()
        assert reply.type_url == type_url and len(reply.resources) == 1  # not the bad name
        assert reply.resources[0].Unpack(kind())
        await ads.ask(type_url, ["echo"], version_info="1", response_nonce=reply.nonce)
    await ads.silent(0.3)  # ACKs, and dropping a name, need no answer

    registry = pb_grpc.RegistryStub(ads_channel)
    changed = time.monotonic()
    await registry.Register(pb.RegisterRequest(instance=instance(2), ttl_ms=LONG_TTL_MS))
    reply = await ads.read(1.0)
    assert time.monotonic() - changed < 1.0
    assert reply.type_url == ENDPOINTS and reply.version_info == "2"  # only what changed
    cla = endpoint_pb2.ClusterLoadAssignment()
    assert reply.resources[0].Unpack(cla)
    assert len(cla.endpoints[0].lb_endpoints) == 2
    await ads.close()

    again = Ads(ads_channel)  # a client that reconnects gets the current state
    await again.ask(ENDPOINTS, ["echo"], version_info="2")
    reply = await again.read()
    assert reply.resources[0].Unpack(cla) and len(cla.endpoints[0].lb_endpoints) == 2
    await again.close()


async def test_a_service_without_instances_has_empty_endpoints_until_it_has_some(
    ads_channel: grpc.aio.Channel,
) -> None:
    ads = Ads(ads_channel)
    await ads.ask(ENDPOINTS, ["later"])  # a client may start before the service it calls
    reply = await ads.read()
    cla = endpoint_pb2.ClusterLoadAssignment()
    assert reply.resources[0].Unpack(cla) and cla.cluster_name == "later"
    assert not cla.endpoints
    await ads.ask(ENDPOINTS, ["later"], version_info="1", response_nonce=reply.nonce)
    registry = pb_grpc.RegistryStub(ads_channel)
    lease = (
        await registry.Register(
            pb.RegisterRequest(instance=instance(1, service="later"), ttl_ms=LONG_TTL_MS)
        )
    ).lease_id
    reply = await ads.read(1.0)
    assert reply.resources[0].Unpack(cla) and len(cla.endpoints[0].lb_endpoints) == 1
    await ads.ask(ENDPOINTS, ["later"], version_info="2", response_nonce=reply.nonce)
    # Its last instance gone, the service gets an empty list, not silence (which, in
    # the state of the world, would leave the client with the instance it knew).
    await registry.Deregister(pb.DeregisterRequest(lease_id=lease))
    reply = await ads.read(1.0)
    assert reply.resources[0].Unpack(cla) and not cla.endpoints
    await ads.close()


async def test_wildcard_listeners_and_the_name_limit(start_registry: StartRegistry) -> None:
    server = await start_registry(replace(FAST, xds_max_names=4))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        for service in ("a", "b"):
            await stub.Register(pb.RegisterRequest(instance=instance(1, service=service)))
        ads = Ads(channel)
        await ads.ask(LISTENER, [])  # empty: every listener
        reply = await ads.read()
        names = sorted(listener_pb2.Listener.FromString(r.value).name for r in reply.resources)
        assert names == ["a", "b"]
        await ads.ask(CLUSTER, ["a", "b", "c", "d", "e"])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ads.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "xds_max_names" in str(caught.value.details())
        await ads.close()


async def test_streams_past_the_limit_are_refused_and_shutdown_ends_the_rest(
    start_registry: StartRegistry,
) -> None:
    server = await start_registry(replace(FAST, xds_max_streams=1))
    async with grpc.aio.insecure_channel(server.address) as channel:
        first = Ads(channel)
        await first.ask(LISTENER, ["echo"])
        await first.read()
        second = Ads(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # refused before any request
            await second.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "xds_max_streams" in str(caught.value.details())
        started = time.monotonic()
        await server.close(grace=5)  # the open stream ends at once, not after the grace
        assert time.monotonic() - started < 2
        await asyncio.wait_for(first.ended(), 2)
        await first.close()
        await second.close()
