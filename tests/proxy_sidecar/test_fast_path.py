"""The unary fast path: shapes published through reflection, and the same semantics as the
stream path (metadata, status, deadline, cancellation, retries) with less work."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar import SidecarServer
from proxy_sidecar.reflect import unary_methods
from proxy_sidecar.routing import parse_method
from tests.proxy_sidecar.conftest import served_by, sidecar_config, wait_for
from tests.proxy_sidecar.test_edges import _get
from tests.proxy_sidecar.upstream import OTHER, SERVICE


def _fast(sidecars) -> int:
    return sum(s.router.local.fast_calls for s in sidecars)


async def test_shapes_are_published_from_reflection(make_mesh, registry):
    # The mesh's sidecars name their gRPC services explicitly: shapes still come from reflection.
    await make_mesh()
    async with grpc.aio.insecure_channel(registry.address) as channel:
        reply = await pb_grpc.RegistryStub(channel).Discover(pb.DiscoverRequest(service="echo"))
    assert len(reply.instances) == 3
    for instance in reply.instances:
        assert instance.metadata["shoal.unary/test.Echo"] == "Unary"
        assert instance.metadata["shoal.unary/test.Other"] == "Unary"


async def test_reflection_describes_what_it_can(upstreams):
    async with grpc.aio.insecure_channel(upstreams[0].address) as channel:
        found = await unary_methods(channel, [SERVICE, OTHER, "nope.Missing"])
    assert found == {SERVICE: ("Unary",), OTHER: ("Unary",)}


async def test_unary_methods_take_the_fast_path_and_streams_do_not(make_mesh):
    mesh = await make_mesh(admin=True)
    echo = mesh.echo
    for i in range(3):
        assert (await echo.unary(b"%d" % i)).endswith(b":%d" % i)
    assert len([r async for r in echo.server_stream(b"2")]) == 2
    assert (await echo.client_stream(iter([b"a"]))).endswith(b":a")
    bidi = echo.bidi()
    await bidi.write(b"b")
    assert (await bidi.read()).endswith(b":b")
    await bidi.done_writing()
    assert await bidi.code() == grpc.StatusCode.OK

    cluster = mesh.client.router.cluster(SERVICE)
    assert (cluster.fast_calls, cluster.requests) == (3, 6)
    # The sidecars beside the apps know the shapes from their app's reflection too.
    assert _fast(mesh.sidecars) == 3
    assert sum(s.router.local.requests for s in mesh.sidecars) == 6
    _, body = await _get(mesh.client.admin_port, "/endpoints")
    assert json.loads(body)["services"][SERVICE]["fast_path_calls"] == 3
    _, body = await _get(mesh.client.admin_port, "/metrics")
    assert b'shoal_sidecar_fast_path_calls_total{service="test.Echo"} 3.0' in body


def _one(mesh, shape: str, payload: bytes, **kwargs: Any) -> Any:
    """The same single-message call on the fast path (unary) or the stream path."""
    if shape == "unary":
        return mesh.echo.unary(payload, **kwargs)
    return mesh.echo.client_stream(iter([payload]), **kwargs)


SHAPES = pytest.mark.parametrize("shape", ["unary", "client_stream"])


@SHAPES
async def test_metadata_status_and_upstream_trailer(make_mesh, shape):
    mesh = await make_mesh()
    ids = {s.address: s.membership.instance_id for s in mesh.sidecars}
    call = _one(mesh, shape, b"x", metadata=[("x-trace", "t-9")])
    name = await served_by(call)
    assert (await call).endswith(b":x")
    assert dict(await call.initial_metadata())["echo-trace"] == "t-9"
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-served-by"] == name
    assert trailing["shoal-upstream"] in ids.values()

    call = _one(mesh, shape, b"x", metadata=[("x-fail", "PERMISSION_DENIED")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err: Any = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "failed as asked (PERMISSION_DENIED)" in err.details()
    trailing = dict(err.trailing_metadata())
    assert trailing["x-reason"] == "asked"
    assert trailing["shoal-upstream"] in ids.values()
    # The hop beside the app does not add its own: one name, the caller's sidecar's.
    assert [k for k, _ in err.trailing_metadata()].count("shoal-upstream") == 1


@SHAPES
async def test_unavailable_is_retried_on_another_instance(make_mesh, shape):
    mesh = await make_mesh(sidecar_config(lb="round_robin"))
    mesh.by_name("up1").fail_with = grpc.StatusCode.UNAVAILABLE
    for i in range(9):
        call = _one(mesh, shape, b"%d" % i)
        assert (await call).endswith(b":%d" % i)
        assert await served_by(call) != "up1"
    cluster = mesh.client.router.cluster(SERVICE)
    assert cluster.retries >= 1
    assert cluster.codes["OK"] == 9


@SHAPES
async def test_deadline_reaches_upstream_and_expires(make_mesh, shape):
    mesh = await make_mesh()
    call = _one(mesh, shape, b"x", timeout=5.0)
    name = await served_by(call)
    await call
    remaining = mesh.by_name(name).deadlines[-1]
    assert remaining is not None and 1.0 < remaining <= 5.5
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _one(mesh, shape, b"x", timeout=0.5, metadata=[("x-sleep", "5")])
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(
        lambda: sum(u.cancelled for u in mesh.upstreams) >= 1,
        what="the upstream call to be cancelled at the deadline",
    )


async def test_client_cancel_of_a_unary_call_reaches_upstream(make_mesh):
    mesh = await make_mesh()
    call = mesh.echo.unary(b"x", metadata=[("x-sleep", "30")])
    # Initial metadata comes with the response on both paths, so wait for the app instead.
    await wait_for(lambda: sum(u.total for u in mesh.upstreams) == 1, what="the call upstream")
    call.cancel()
    await wait_for(
        lambda: sum(u.cancelled for u in mesh.upstreams) == 1, what="the upstream to see it"
    )
    assert _fast(mesh.sidecars) == 1


@SHAPES
async def test_per_try_timeout_retries_elsewhere(make_mesh, shape):
    idempotent = ["Unary", "ClientStream"]
    config = sidecar_config(
        lb="round_robin",
        defaults={"per_try_timeout": 0.3, "retry": {"idempotent_methods": idempotent}},
    )
    mesh = await make_mesh(config)
    mesh.by_name("up2").delay = 3.0
    for i in range(6):
        call = _one(mesh, shape, b"%d" % i, timeout=10)
        await call
        assert await served_by(call) != "up2"
    expected = 6 if shape == "unary" else 0
    assert mesh.client.router.cluster(SERVICE).fast_calls == expected


async def test_shapes_declared_by_hand_win_over_reflection(registry, upstreams):
    membership = {
        "ttl": 1.5,
        "grpc_services": [SERVICE, OTHER],
        "metadata": {"shoal.unary/test.Other": ""},
    }
    async with SidecarServer(
        "127.0.0.1:0",
        registry.address,
        sidecar_config(membership=membership),
        service="echo",
        app=upstreams[0].address,
    ) as sidecar:
        assert sidecar.membership is not None
        assert sidecar.membership.unary == {SERVICE: frozenset({"Unary"}), OTHER: frozenset()}
        async with grpc.aio.insecure_channel(registry.address) as channel:
            reply = await pb_grpc.RegistryStub(channel).Discover(pb.DiscoverRequest(service="echo"))
        (instance,) = reply.instances
        assert instance.metadata["shoal.unary/test.Other"] == ""
        assert instance.metadata["shoal.unary/test.Echo"] == "Unary"
        other = parse_method(f"/{OTHER}/Unary")
        assert other is not None and not sidecar.router.is_unary(other)
