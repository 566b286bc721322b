"""Bad input gets a clear status naming the field, and the server keeps serving."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryServer
from tests.registry_service.conftest import instance

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub as Stub
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def still_serving(stub: Stub) -> None:
    reply = await stub.Register(pb.RegisterRequest(instance=instance(99, service="canary")))
    assert reply.lease_id


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"instance_id": ""}, "instance.instance_id"),
        ({"instance_id": "x" * 129}, "instance.instance_id"),
        ({"instance_id": "bad id"}, "instance.instance_id"),
        ({"instance_id": "x1", "service": ""}, "instance.service"),
        ({"instance_id": "x1", "service": "s" * 200}, "instance.service"),
        ({"instance_id": "x1", "service": "no/slash"}, "instance.service"),
        ({"address": ""}, "instance.address"),
        ({"address": "localhost"}, "instance.address"),
        ({"address": "host:0"}, "instance.address"),
        ({"address": "host:70000"}, "instance.address"),
        ({"address": "host:http"}, "instance.address"),
        ({"address": "::1:80"}, "instance.address"),
        ({"address": "bad_host!:80"}, "instance.address"),
        ({"grpc_services": ["not a name"]}, "instance.grpc_services"),
        ({"grpc_services": [f"a.S{i}" for i in range(65)]}, "instance.grpc_services"),
        ({"metadata": {"k": "v" * 2000}}, "instance.metadata[k]"),
        ({"metadata": {"": "v"}}, "instance.metadata key"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "instance.metadata"),
        ({"weight": 10_001}, "instance.weight"),
        ({"zone": "z one"}, "instance.zone"),
        ({"status": 7}, "instance.status"),
    ],
)
async def test_register_rejects_bad_fields(stub: Stub, fields: dict[str, Any], named: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(pb.RegisterRequest(instance=instance(1, **fields)))
    assert err.value.code() == INVALID
    assert (err.value.details() or "").startswith(named), err.value.details()
    await still_serving(stub)


async def test_register_without_instance_or_with_absurd_ttl(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(pb.RegisterRequest())
    assert err.value.code() == INVALID and "instance" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(pb.RegisterRequest(instance=instance(1), ttl_ms=90_000_000))
    assert err.value.code() == INVALID and "ttl_ms" in (err.value.details() or "")


async def test_bad_heartbeats(stub: Stub) -> None:
    lease = (await stub.Register(pb.RegisterRequest(instance=instance(1)))).lease_id
    cases = [
        (pb.HeartbeatRequest(), INVALID, "lease_id"),
        (pb.HeartbeatRequest(lease_id="x" * 65), INVALID, "lease_id"),
        (pb.HeartbeatRequest(lease_id="nope"), grpc.StatusCode.NOT_FOUND, "lease"),
        (pb.HeartbeatRequest(lease_id=lease, status=9), INVALID, "status"),  # type: ignore[arg-type]
        (
            pb.HeartbeatRequest(lease_id=lease, load=pb.LoadReport(cpu_percent=float("nan"))),
            INVALID,
            "load.cpu_percent",
        ),
        (
            pb.HeartbeatRequest(lease_id=lease, load=pb.LoadReport(cpu_percent=-1)),
            INVALID,
            "load.cpu_percent",
        ),
    ]
    for request, code, named in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(request)
        assert err.value.code() == code
        assert named in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Deregister(pb.DeregisterRequest(lease_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Discover(pb.DiscoverRequest(service="bad name"))
    assert err.value.code() == INVALID
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Watch(pb.WatchRequest(service="bad name")).read()
    assert err.value.code() == INVALID
    await still_serving(stub)


async def test_same_id_from_another_address_is_already_exists(stub: Stub) -> None:
    await stub.Register(pb.RegisterRequest(instance=instance(1, address="10.1.1.1:80")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(pb.RegisterRequest(instance=instance(1, address="10.1.1.2:80")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "10.1.1.1:80" in (err.value.details() or "")


async def test_garbage_and_wrong_message_types(channel: grpc.aio.Channel, stub: Stub) -> None:
    raw = channel.unary_unary("/shoal.registry.v1.Registry/Register", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\xff\xff\xff\xff garbage \x00\x01")
    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    # A well-formed message of the wrong type parses as nonsense fields, not a crash.
    wrong = pb.WatchRequest(service="echo", since_revision=12).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(wrong)
    assert err.value.code() in (grpc.StatusCode.INTERNAL, INVALID)
    unknown = channel.unary_unary("/shoal.registry.v1.Registry/NoSuchMethod", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unknown(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await still_serving(stub)


async def test_oversize_message_is_refused(stub: Stub) -> None:
    big = instance(1, metadata={f"k{i}": "v" * 1000 for i in range(1500)})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Register(pb.RegisterRequest(instance=big))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await still_serving(stub)


async def test_clients_vanishing_mid_watch_are_released(registry: RegistryServer) -> None:
    for _ in range(5):
        channel = grpc.aio.insecure_channel(registry.address)
        stub: Stub = pb_grpc.RegistryStub(channel)
        call = stub.Watch(pb.WatchRequest())
        await call.read()
        await channel.close(grace=None)  # gone without a goodbye
    deadline = asyncio.get_running_loop().time() + 5
    while registry.servicer.hub.watchers:
        assert asyncio.get_running_loop().time() < deadline, "watch streams never released"
        await asyncio.sleep(0.05)
    async with grpc.aio.insecure_channel(registry.address) as channel:
        await still_serving(pb_grpc.RegistryStub(channel))
