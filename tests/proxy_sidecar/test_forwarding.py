"""All four call shapes through a client sidecar, an upstream sidecar and the app."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.proxy_sidecar.conftest import served_by


async def test_unary_round_trip_with_metadata(make_mesh):
    mesh = await make_mesh()
    call = mesh.echo.unary(b"hello", metadata=[("x-trace", "t-1"), ("x-blob-bin", b"\x00\xff")])
    reply = await call
    name = await served_by(call)
    assert reply == f"{name}:".encode() + b"hello"
    initial = dict(await call.initial_metadata())
    assert initial["echo-trace"] == "t-1"
    assert initial["echo-blob-bin"] == b"\x00\xff"
    assert dict(await call.trailing_metadata())["x-served-by"] == name
    seen = mesh.by_name(name).seen_metadata[-1]
    assert "shoal-hop" not in seen, "the hop marker must not reach the app"
    assert seen["x-trace"] == "t-1"


async def test_server_streaming(make_mesh):
    mesh = await make_mesh()
    call = mesh.echo.server_stream(b"5")
    replies = [r async for r in call]
    name = await served_by(call)
    assert replies == [f"{name}:{i}".encode() for i in range(5)]


async def test_client_streaming(make_mesh):
    mesh = await make_mesh()

    async def parts():
        for p in (b"a", b"b", b"c"):
            yield p

    call = mesh.echo.client_stream(parts())
    reply = await call
    assert reply == f"{await served_by(call)}:a+b+c".encode()


async def test_bidi_interleaved(make_mesh):
    mesh = await make_mesh()
    call = mesh.echo.bidi()
    name = None
    for i in range(4):
        await call.write(f"m{i}".encode())
        reply = await call.read()
        name = name or reply.split(b":")[0].decode()
        assert reply == f"{name}:m{i}".encode()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await call.code() == grpc.StatusCode.OK


async def test_status_details_and_trailers_come_back(make_mesh):
    mesh = await make_mesh()
    call = mesh.echo.unary(b"x", metadata=[("x-fail", "NOT_FOUND")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err: Any = info.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "failed as asked (NOT_FOUND)" in err.details()
    assert dict(err.trailing_metadata())["x-reason"] == "asked"


async def test_upstream_cancel_reaches_client(make_mesh):
    mesh = await make_mesh()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.echo.unary(b"x", metadata=[("x-cancel", "1")])
    assert info.value.code() == grpc.StatusCode.CANCELLED


async def test_many_concurrent_calls(make_mesh):
    mesh = await make_mesh()
    replies = await asyncio.gather(*(mesh.echo.unary(b"%d" % i) for i in range(200)))
    assert all(r.endswith(b":%d" % i) for i, r in enumerate(replies))
