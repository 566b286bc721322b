"""Proxyless clients and registry replicas: a bootstrap that lists two replicas of one
etcd-backed registry (``shoal xds-bootstrap --registry A,B``), read by a real grpcio
client. gRPC's xDS fallback (gRFC A71) goes to the next server only while the first
cannot be reached and some resource is not cached yet: a client that starts while its
first replica is down gets the mesh from the second; one that has the mesh already
keeps calling the instances it knows until its replica is back."""

from __future__ import annotations

import json
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


async def test_a_client_started_while_the_first_replica_is_down_reads_the_second(
    registry_etcd: EtcdCluster, echoes: Echoes, tmp_path: Path
) -> None:
    prefix = f"/test/xds/{uuid.uuid4().hex}/".encode()
    config = fit(FAST, "etcd")
    clients = [EtcdClient(registry_etcd.endpoints, timeout=2.0) for _ in range(2)]
    replicas = [
        RegistryServer(
            "127.0.0.1:0", config, backend=EtcdBackend(config, c, prefix=prefix, start_timeout=5.0)
        )
        for c in clients
    ]
    for replica in replicas:
        await replica.start()
    first, second = replicas
    client = None
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.RegistryStub(channel)
            for n in (1, 2):
                await register(stub, n, await echoes.start(f"echo-{n}"))
            await first.close(grace=0.5)
            bootstrap = tmp_path / "xds.json"
            document = bootstrap_document([first.address, second.address], "app-1", "", "")
            bootstrap.write_text(json.dumps(document))
            client = Client(bootstrap)
            await client.wait_for(
                lambda: {a for _, a in client.lines} >= {"echo-1", "echo-2"}, 20, "both"
            )
            # And it follows changes there, while the first stays away.
            await register(stub, 3, await echoes.start("echo-3"))
            await client.wait_for(
                lambda: any(a == "echo-3" for _, a in client.lines), 10, "echo-3 traffic"
            )
    finally:
        if client is not None:
            await client.close()
        for replica in replicas:
            await replica.close(grace=0.5)
        for c in clients:
            await c.aclose()
