"""The registry's memory stays bounded however callers churn or flood it (measured RSS).

A registry process of its own (`shoal registry`), a watcher that reads and one
that never does; then register+deregister churn with the largest metadata the
registry accepts, and junk instances up to the instance bound. Memory is read from
the process (RSS), so what is measured is what an operator would see.
"""

from __future__ import annotations

import grpc

from bench.registry_memory import (
    MAX_METADATA_MAP,
    caught_up,
    churn,
    flood,
    start_registry,
    watchers,
)
from protos import registry_pb2_grpc as pb_grpc

MIB = 1024 * 1024
HISTORY_BYTES = 4 * MIB
MAX_INSTANCES = 100
# 1000 cycles are 2000 events of about 80 KB each: 160 MB if the history, the rendered
# message cache or the stalled watcher's queue kept them (today's code: +360 MiB), while
# the history may hold 4 MiB here and each watch queue 4 MiB (the default).
CYCLES = 1000
# The warm-up already fills those bounded structures, so what the churn may add is
# the allocator's slack, with room for the three bounds if the warm-up left them short
# (measured: +1 to +2 MiB).
CHURN_BOUND_MIB = 20
# 100 instances with the largest metadata hold the spec (~80 KB) and its rendered
# message (~87 KB) each, about 16 MiB; the flood tries 300 (measured: +13 MiB).
JUNK_BOUND_MIB = 30


async def test_registry_rss_stays_bounded_under_metadata_churn_and_junk() -> None:
    flags = ["--history-bytes", str(HISTORY_BYTES), "--max-instances", str(MAX_INSTANCES)]
    with start_registry(flags) as registry:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = pb_grpc.RegistryStub(channel)
            async with watchers(registry.address) as seen:
                # Warm-up: imports, gRPC buffers and the allocator's first arenas.
                await churn(stub, 200, prefix="warm")
                await caught_up(seen, stub)
                base = registry.rss_mib()
                await churn(stub, CYCLES)
                await caught_up(seen, stub)
                after_churn = registry.rss_mib()
                assert after_churn - base < CHURN_BOUND_MIB, (base, after_churn)
                accepted, refusal = await flood(stub, 3 * MAX_INSTANCES, MAX_METADATA_MAP)
                assert (accepted, refusal) == (MAX_INSTANCES, grpc.StatusCode.RESOURCE_EXHAUSTED)
                await caught_up(seen, stub)
                after_junk = registry.rss_mib()
                assert after_junk - after_churn < JUNK_BOUND_MIB, (after_churn, after_junk)
