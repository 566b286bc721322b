"""Every call shape gets the same semantics through the data plane: metadata, status,
the upstream trailer, retries, deadlines, cancellation and per-try timeouts."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from tests.proxy_sidecar.conftest import served_by, sidecar_config, wait_for
from tests.proxy_sidecar.test_edges import _get
from tests.proxy_sidecar.upstream import SERVICE


async def test_every_shape_is_forwarded_and_counted(make_mesh):
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
    assert cluster.requests == 6
    # A call's end reaches the control plane just after its answer reaches the caller.
    await wait_for(lambda: cluster.code_counts().get("OK") == 6, what="six calls counted OK")
    # Delivered to the apps by their own sidecars, through the local cluster.
    assert sum(s.router.local.requests for s in mesh.sidecars) == 6
    _, body = await _get(mesh.client.admin_port, "/endpoints")
    assert json.loads(body)["services"][SERVICE]["requests"] == 6
    _, body = await _get(mesh.client.admin_port, "/metrics")
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("shoal_sidecar_requests_total{")
        and all(f in line for f in ('code="OK"', 'direction="outbound"', 'service="test.Echo"'))
    ]
    assert sum(counted) == 6


def _one(mesh, shape: str, payload: bytes, **kwargs: Any) -> Any:
    """The same single-message call as a unary call or as a client stream."""
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
    await wait_for(lambda: cluster.code_counts().get("OK") == 9, what="nine calls counted OK")


@SHAPES
async def test_deadline_reaches_upstream_and_expires(make_mesh, shape):
    mesh = await make_mesh()
    call = _one(mesh, shape, b"x", timeout=5.0)
    name = await served_by(call)
    await call
    remaining = mesh.by_name(name).deadlines[-1]
    # The wire encodes timeouts coarsely: allow a little over 5 s, but not the default of none.
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
    # Headers reach the caller with the first message, so wait for the app instead.
    await wait_for(lambda: sum(u.total for u in mesh.upstreams) == 1, what="the call upstream")
    call.cancel()
    await wait_for(
        lambda: sum(u.cancelled for u in mesh.upstreams) == 1, what="the upstream to see it"
    )


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
    assert mesh.client.router.cluster(SERVICE).retries >= 1
