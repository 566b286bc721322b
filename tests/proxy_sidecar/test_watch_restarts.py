"""The sidecar counts how each re-established registry watch went on, on its real
/metrics page: ``resumed`` after the last revision it saw, or ``snapshot`` (started
again from scratch). Replicas over one etcd share revisions, so moving from a killed
replica to another resumes; a memory registry that restarts has forgotten its history,
so the watch starts again from a snapshot. The first snapshot of all is no restart.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from tests.etcd_cluster import (
    EtcdCluster,
    etcd_cluster_fixture,  # noqa: F401
    requires_etcd,
)
from tests.proxy_sidecar.conftest import FAST_REGISTRY, sidecar_config, wait_for
from tests.shoal_cli.test_registry_etcd import replica, spec

METRIC = "shoal_sidecar_registry_watch_restarts"
TIMEOUT = 10.0


def _get(port: int, page: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{page}", timeout=5) as reply:
        assert reply.status == 200
        body: bytes = reply.read()
        return body.decode()


async def restarts(sidecar: SidecarServer) -> dict[str, float]:
    """The counter by outcome, as the sidecar's /metrics page shows it."""
    text = await asyncio.to_thread(_get, sidecar.admin_port, "metrics")
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == METRIC)
    return {s.labels["outcome"]: s.value for s in family.samples if s.name == f"{METRIC}_total"}


async def endpoints_page(sidecar: SidecarServer) -> dict[str, Any]:
    text = await asyncio.to_thread(_get, sidecar.admin_port, "endpoints")
    page: dict[str, Any] = json.loads(text)
    return page


def sees(sidecar: SidecarServer, instance_id: str) -> bool:
    return any(e.instance_id == instance_id for e in sidecar.table.endpoints())


async def register(address: str, instance: pb.Instance) -> pb.RegisterResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        reply: pb.RegisterResponse = await pb_grpc.RegistryStub(channel).Register(
            pb.RegisterRequest(instance=instance, ttl_ms=10_000), timeout=5
        )
        return reply


async def revision_at(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.RegistryStub(channel).Discover(
            pb.DiscoverRequest(service="echo"), timeout=5
        )
        return int(reply.revision)


@requires_etcd
async def test_moving_to_another_etcd_replica_resumes_without_a_snapshot(
    etcd_cluster: EtcdCluster,
):
    endpoints = etcd_cluster.endpoints
    with replica(endpoints) as (a, at_a), replica(endpoints) as (_, at_b):
        async with SidecarServer(
            "127.0.0.1:0", f"{at_a},{at_b}", sidecar_config(), admin="127.0.0.1:0"
        ) as sidecar:
            assert sidecar.registry_address == at_a
            await wait_for(lambda: sidecar.table.synced, TIMEOUT, "the first snapshot")
            assert await restarts(sidecar) == {"resumed": 0, "snapshot": 0}
            await register(at_a, spec(1))
            await wait_for(lambda: sees(sidecar, "echo-1"), TIMEOUT, "echo-1 through A")
            # B has followed etcd as far as the sidecar has: its history covers the gap.
            seen = sidecar.discovery.revision

            async def caught_up() -> bool:
                return await revision_at(at_b) >= seen

            await wait_for(caught_up, TIMEOUT, "B caught up")

            a.kill()
            a.wait(timeout=5)
            await register(at_b, spec(2))
            await wait_for(lambda: sees(sidecar, "echo-2"), TIMEOUT, "echo-2 through B")
            assert sidecar.registry_address == at_b
            assert sees(sidecar, "echo-1")  # kept: no snapshot replaced the table
            assert await restarts(sidecar) == {"resumed": 1, "snapshot": 0}
            page = await endpoints_page(sidecar)
            assert page["registry"]["watch_restarts"] == {"resumed": 1, "snapshot": 0}


async def test_a_memory_registry_restarted_on_its_port_gives_a_snapshot(
    registry: RegistryServer,
):
    address = registry.address
    async with SidecarServer(
        "127.0.0.1:0", address, sidecar_config(), admin="127.0.0.1:0"
    ) as sidecar:
        await wait_for(lambda: sidecar.table.synced, TIMEOUT, "the first snapshot")
        await register(address, spec(1))
        await wait_for(lambda: sees(sidecar, "echo-1"), TIMEOUT, "echo-1")
        assert sidecar.discovery.revision > 0
        assert await restarts(sidecar) == {"resumed": 0, "snapshot": 0}

        await registry.close(grace=0)
        # The same address, a new run: its revisions start over, its history is empty.
        async with RegistryServer(address, FAST_REGISTRY) as back:

            async def counted() -> bool:
                return (await restarts(sidecar))["snapshot"] == 1

            await wait_for(counted, TIMEOUT, "the restart counted")
            # Registered only now: the new run's revisions could otherwise reach the one
            # the sidecar resumes from, and it would take them for a history it knows.
            await register(back.address, spec(2))
            await wait_for(lambda: sees(sidecar, "echo-2"), TIMEOUT, "echo-2 after the restart")
            # The snapshot replaced the table (the empty set was only held meanwhile).
            await wait_for(lambda: not sees(sidecar, "echo-1"), TIMEOUT, "echo-1 forgotten")
            assert await restarts(sidecar) == {"resumed": 0, "snapshot": 1}
            page = await endpoints_page(sidecar)
            assert page["registry"]["watch_restarts"] == {"resumed": 0, "snapshot": 1}
