"""Proxyless clients and registry replicas: a bootstrap that lists two replicas of one
etcd-backed registry (``shoal xds-bootstrap --registry A,B``), read by a real grpcio
client. gRPC's xDS fallback (gRFC A71) goes to the next server only while the first
cannot be reached and some resource is not cached yet: a client that starts while its
first replica is down gets the mesh from the second; one that has the mesh already
keeps calling the instances it knows until its replica is back."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryServer
from registry_service.etcd import EtcdClient
from registry_service.etcd_store import EtcdBackend
from shoal_cli.xds_cmd import bootstrap_document
from tests.etcd_cluster import EtcdCluster
from tests.registry_service.conftest import FAST, fit
from tests.registry_service.test_xds import Client, Echoes, register


@pytest.fixture
async def echoes() -> AsyncIterator[Echoes]:
    started = Echoes()
    yield started
    await started.close()


@contextlib.asynccontextmanager
async def two_replicas(cluster: EtcdCluster) -> AsyncIterator[list[RegistryServer]]:
    """Two registry servers over one etcd prefix, as `--store etcd://` runs them."""
    prefix = f"/test/xds/{uuid.uuid4().hex}/".encode()
    config = fit(FAST, "etcd")
    clients = [EtcdClient(cluster.endpoints, timeout=2.0) for _ in range(2)]
    replicas = [
        RegistryServer(
            "127.0.0.1:0", config, backend=EtcdBackend(config, c, prefix=prefix, start_timeout=5.0)
        )
        for c in clients
    ]
    try:
        for replica in replicas:
            await replica.start()
        yield replicas
    finally:
        for replica in replicas:
            await replica.close(grace=0.5)
        for c in clients:
            await c.aclose()


@contextlib.asynccontextmanager
async def xds_client(bootstrap: Path, *server_uris: str) -> AsyncIterator[Client]:
    document = bootstrap_document(list(server_uris), "app-1", "", "")
    bootstrap.write_text(json.dumps(document))
    client = Client(bootstrap)
    try:
        yield client
    finally:
        await client.close()


async def test_a_client_started_while_the_first_replica_is_down_reads_the_second(
    registry_etcd: EtcdCluster, echoes: Echoes, tmp_path: Path
) -> None:
    async with two_replicas(registry_etcd) as (first, second):
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.RegistryStub(channel)
            for n in (1, 2):
                await register(stub, n, await echoes.start(f"echo-{n}"))
            await first.close(grace=0.5)
            async with xds_client(tmp_path / "xds.json", first.address, second.address) as client:
                await client.wait_for(
                    lambda: {a for _, a in client.lines} >= {"echo-1", "echo-2"}, 20, "both"
                )
                # And it follows changes there, while the first stays away.
                await register(stub, 3, await echoes.start("echo-3"))
                await client.wait_for(
                    lambda: any(a == "echo-3" for _, a in client.lines), 10, "echo-3 traffic"
                )


async def test_one_name_for_all_replicas_fails_over_at_once_with_the_current_state(
    registry_etcd: EtcdCluster, echoes: Echoes, tmp_path: Path
) -> None:
    # One target with every replica's address, as a DNS name for all of them resolves:
    # the xDS channel reconnects to another address and its new stream gets the state.
    async with two_replicas(registry_etcd) as (first, second):
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.RegistryStub(channel)
            for n in (1, 2):
                await register(stub, n, await echoes.start(f"echo-{n}"))
            target = f"ipv4:{first.address},{second.address}"
            async with xds_client(tmp_path / "xds.json", target) as client:
                await client.wait_for(
                    lambda: {a for _, a in client.lines} >= {"echo-1", "echo-2"}, 20, "both"
                )
                await first.close(grace=0.5)
                stopped = time.time()
                await register(stub, 3, await echoes.start("echo-3"))
                await client.wait_for(
                    lambda: any(a == "echo-3" for _, a in client.lines), 10, "echo-3 traffic"
                )
                after = [a for at, a in client.lines if at > stopped]
                assert not [a for a in after if a.startswith("ERR")], after
