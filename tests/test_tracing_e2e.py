"""One trace per call across every hop: client sidecar, worker sidecar, worker, pool.

A registry, a worker behind its sidecar, and a client sidecar, every one of them
tracing every call to a real OTLP/gRPC receiver. Calls go through the client sidecar as
an app makes them, with and without a caller's ``traceparent``; each call's spans must
form one tree: the client sidecar's CLIENT span, the worker sidecar's SERVER span under
it, the worker's SERVER span under that, and the worker's queue wait and execution under
the worker's span, each inside its parent in time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from shoal_core.tracing import TraceSettings, parse_traceparent
from tests.otlp_receiver import (
    KIND_CLIENT,
    KIND_SERVER,
    OtlpReceiver,
    ReceivedSpan,
    check_tree,
    children_of,
    span_trees,
)
from tests.proxy_sidecar.conftest import FAST_REGISTRY, routable, sidecar_config, wait_for
from tests.worker_node.conftest import config as worker_config
from worker_node import WorkerServer
from worker_node.tracing import EXECUTE, QUEUE

WORKER = "shoal.worker.v1.Worker"
CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextlib.asynccontextmanager
async def traced_mesh(endpoint: str, sample: float = 1.0) -> AsyncIterator[SidecarServer]:
    def trace(service: str) -> TraceSettings:
        return TraceSettings(endpoint=endpoint, service=service, sample=sample)

    config = sidecar_config(membership={"ttl": 1.5, "grpc_services": [WORKER]})
    async with contextlib.AsyncExitStack() as stack:
        registry = await stack.enter_async_context(RegistryServer("127.0.0.1:0", FAST_REGISTRY))
        worker = await stack.enter_async_context(
            WorkerServer("127.0.0.1:0", worker_config(), trace=trace("worker"))
        )
        sidecar = SidecarServer(
            "127.0.0.1:0",
            registry.address,
            config,
            service="worker",
            app=worker.address,
            inbound="127.0.0.1:0",
            trace=trace("sidecar"),
        )
        await stack.enter_async_context(sidecar)
        client = SidecarServer("127.0.0.1:0", registry.address, config, trace=trace("sidecar"))
        await stack.enter_async_context(client)
        await wait_for(lambda: routable(client, WORKER) == 1, what="the worker routable")
        yield client


def only(spans: list[ReceivedSpan], **fields: object) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in fields.items())]
    assert len(found) == 1, (fields, found)
    return found[0]


def check_call_tree(spans: list[ReceivedSpan], method: str, parent: str = "") -> None:
    """The spans of one call: the five hops' spans, one tree, in the order of the hops."""
    root = check_tree(spans, parent)
    name = f"{WORKER}/{method}"
    assert (root.service, root.name, root.kind) == ("sidecar", name, KIND_CLIENT)
    assert root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["shoal.upstream"]  # the instance the client sidecar picked
    [inbound] = children_of(spans, root)
    assert (inbound.service, inbound.name, inbound.kind) == ("worker-sidecar", name, KIND_SERVER)
    [worker] = children_of(spans, inbound)
    assert (worker.service, worker.name, worker.kind) == ("worker", name, KIND_SERVER)
    if method == "Call":
        assert [s.name for s in children_of(spans, worker)] == [QUEUE, EXECUTE]


async def test_every_call_is_one_tree_across_sidecars_worker_and_pool():
    async with OtlpReceiver() as receiver:
        async with traced_mesh(receiver.endpoint) as client:
            async with grpc.aio.insecure_channel(client.address) as channel:
                stub = wpb_grpc.WorkerStub(channel)
                for _ in range(3):
                    await stub.Call(wpb.CallRequest(function="upper", payload=b"x"), timeout=10)
                await stub.Echo(wpb.EchoRequest(payload=b"e"), timeout=10)
                await stub.Call(
                    wpb.CallRequest(function="upper", payload=b"y"),
                    timeout=10,
                    metadata=(("traceparent", CALLER),),
                )
        # Closing flushed every exporter: 4 started traces + 1 continued, 3 or 5 spans each.
        spans = await receiver.wait_for(lambda got: len(got) >= 4 * 5 + 3, timeout=15)
    trees = span_trees(spans)
    caller = parse_traceparent(CALLER)
    assert caller is not None
    continued = f"{caller.trace_id:032x}"
    assert len(trees) == 5 and continued in trees
    for trace_id in trees:
        members = [s for s in spans if s.trace_id == trace_id]
        method = "Echo" if len(members) == 3 else "Call"
        parent = f"{caller.span_id:016x}" if trace_id == continued else ""
        check_call_tree(members, method, parent)


async def test_with_sampling_off_calls_carry_a_trace_but_nothing_is_recorded():
    async with OtlpReceiver() as receiver:
        async with traced_mesh(receiver.endpoint, sample=0.0) as client:
            async with grpc.aio.insecure_channel(client.address) as channel:
                stub = wpb_grpc.WorkerStub(channel)
                for _ in range(5):
                    await stub.Echo(wpb.EchoRequest(payload=b"e"), timeout=10)
                # A caller's sampled trace is still followed through every hop.
                await stub.Echo(
                    wpb.EchoRequest(payload=b"e"), timeout=10, metadata=(("traceparent", CALLER),)
                )
        spans = await receiver.wait_for(lambda got: len(got) >= 3, timeout=15)
    assert {s.trace_id for s in spans} == {CALLER.split("-")[1]}
    check_call_tree(spans, "Echo", CALLER.split("-")[2])
