"""One rule from domain errors to statuses: by class, most specific first, unary and streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from registry_service.errors import InvalidArgument, LeaseNotFound, RegistryError
from registry_service.servicer import CODES
from shoal_core import codes
from shoal_core.codes import ErrorCodes
from shoal_core.servicing import maps_errors


class Base(Exception):
    pass


class Specific(Base):
    pass


class MoreSpecific(Specific):
    pass


def test_the_most_specific_class_wins_and_subclasses_inherit_their_bases_code():
    codes = ErrorCodes[str]({Base: "base", Specific: "specific"}, default="default")
    assert codes(Base()) == "base"
    assert codes(Specific()) == "specific"
    # Not named itself: the nearest named base, not the default.
    assert codes(MoreSpecific()) == "specific"
    assert codes(ValueError()) == "default"


def test_a_new_registry_error_subclass_keeps_its_base_status():
    class EmptyField(InvalidArgument):
        pass

    assert CODES(EmptyField("instance.address", "must not be empty")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert CODES(LeaseNotFound("gone")) == grpc.StatusCode.NOT_FOUND
    assert CODES(RegistryError("anything else")) == grpc.StatusCode.FAILED_PRECONDITION


_mapped = maps_errors(RegistryError, CODES)


class _Servicer:
    @_mapped
    async def unary(self, request: bytes, context: Any) -> bytes:
        raise LeaseNotFound(f"no lease {request.decode()}")

    @_mapped
    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise InvalidArgument("service", "nope")

    @_mapped
    async def bug(self, request: bytes, context: Any) -> bytes:
        raise KeyError("a bug, not a domain error")


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    servicer = _Servicer()
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.unary),
        "Stream": grpc.unary_stream_rpc_method_handler(servicer.stream),
        "Bug": grpc.unary_unary_rpc_method_handler(servicer.bug),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_unary_and_streaming_handlers_end_with_their_errors_status(channel: Any):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary("/t.S/Unary")(b"L1")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no lease L1"
    call = channel.unary_stream("/t.S/Stream")(b"")
    assert await call.read() == b"first"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "service: nope"
    # Only the service's own errors are mapped: a bug stays a bug.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary("/t.S/Bug")(b"")
    assert info.value.code() == grpc.StatusCode.UNKNOWN


def test_the_workers_errors_map_by_class_too():
    from worker_node import errors
    from worker_node.servicer import CODES as WORKER_CODES

    class SlowKill(errors.TaskTimeout):
        pass

    assert WORKER_CODES(SlowKill("late")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert WORKER_CODES(errors.TaskFailed("ran and failed")) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert WORKER_CODES(errors.Overloaded("full")) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_named_status_numbers_are_grpcs() -> None:
    named = {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "UNIMPLEMENTED",
             "INTERNAL", "UNAVAILABLE"}  # fmt: skip
    for name in named:
        number = getattr(codes, name)
        assert number == getattr(grpc.StatusCode, name).value[0]
        assert codes.code_name(number) == name
