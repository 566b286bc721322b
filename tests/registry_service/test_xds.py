"""The registry's xDS end to end: plain grpcio clients with ``xds:///echo`` targets,
in processes of their own, reach real echo servers registered through the Registry
API; and the resources they are served, field by field."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service.model import Instance, InstanceSpec, ServingStatus
from registry_service.xds import resources
from tests.registry_service.conftest import StartRegistry, instance

ROOT = Path(__file__).resolve().parents[2]
LONG_TTL_MS = 30_000  # no heartbeats needed while a test runs
Health = health_check_pb2.HealthStatus


async def start_echo(name: str, delay: float = 0.0) -> tuple[grpc.aio.Server, int]:
    """A real gRPC server whose /test.Echo/Who answers its own name after ``delay``."""

    async def who(request: bytes, context: Any) -> bytes:
        if delay:
            await asyncio.sleep(delay)
        return name.encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class Echoes:
    """Echo servers started by name, all stopped by ``close``."""

    def __init__(self) -> None:
        self._servers: list[grpc.aio.Server] = []
        self.by_name: dict[str, grpc.aio.Server] = {}

    async def start(self, name: str, delay: float = 0.0) -> int:
        server, port = await start_echo(name, delay)
        self._servers.append(server)
        self.by_name[name] = server
        return port

    async def close(self) -> None:
        for server in self._servers:
            await server.stop(0)


@pytest.fixture
async def echoes() -> AsyncIterator[Echoes]:
    started = Echoes()
    yield started
    await started.close()


class Client:
    """``xds_client.py`` in its own process, its lines gathered as (time, answer)."""

    def __init__(self, bootstrap: Path, *args: str, target: str = "xds:///echo") -> None:
        """``args``: the client's optional KEYS and THREADS (see ``xds_client``)."""
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.registry_service.xds_client", target, "0.02", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = asyncio.get_running_loop().run_in_executor(None, self._read)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at, _, answer = line.strip().partition(" ")
            self.lines.append((float(at), answer))

    async def wait_for(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"client exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"{what}: {self.lines[-10:]}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 5)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
        await self._reader
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def register(stub: Any, n: int, port: int, host: str = "127.0.0.1") -> str:
    reply = await stub.Register(
        pb.RegisterRequest(instance=instance(n, address=f"{host}:{port}"), ttl_ms=LONG_TTL_MS)
    )
    return str(reply.lease_id)


def write_bootstrap(registry: str, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shoal_cli.main", "xds-bootstrap", "--registry", registry,
         "--node-id", "test-client", "--out", str(out)],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=True,
    )  # fmt: skip
    assert f"GRPC_XDS_BOOTSTRAP={out}" in done.stdout


async def test_plain_grpc_clients_spread_over_instances_and_follow_changes(
    start_registry: StartRegistry,
    echoes: Echoes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = await start_registry()
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        leases = {n: await register(stub, n, await echoes.start(f"echo-{n}")) for n in (1, 2, 3)}
        write_bootstrap(registry.address, tmp_path / "bootstrap.json")
        client = Client(tmp_path / "bootstrap.json")
        try:
            await client.wait_for(lambda: len(client.lines) >= 60, 20, "60 calls")
            first = [answer for _, answer in client.lines[:60]]
            assert set(first) == {"echo-1", "echo-2", "echo-3"}, first

            port = await echoes.start("echo-4")
            added = time.time()
            await register(stub, 4, port)
            await client.wait_for(
                lambda: any(a == "echo-4" for _, a in client.lines), 5, "echo-4 traffic"
            )
            reached = min(at for at, a in client.lines if a == "echo-4")
            assert reached - added < 2.0

            await stub.Deregister(pb.DeregisterRequest(lease_id=leases[1]))
            await stub.Heartbeat(pb.HeartbeatRequest(lease_id=leases[2], status=pb.DRAINING))
            gone = time.time()
            await client.wait_for(lambda: client.lines[-1][0] > gone + 2.0, 5, "calls after")
            later = {a for at, a in client.lines if at > gone + 1.0}
            assert later == {"echo-3", "echo-4"}  # not the removed one, nor the draining one
            assert not [a for _, a in client.lines if a.startswith("ERR")]
            assert not [r for r in caplog.records if "rejected" in r.getMessage()]  # no NACK
        finally:
            await client.close()


async def test_instances_registered_by_host_name_are_served_as_addresses_grpc_takes(
    start_registry: StartRegistry,
    echoes: Echoes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # gRPC NACKs a whole endpoint list holding a name: the registry resolves it.
    registry = await start_registry()
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        for n in (1, 2):
            await register(stub, n, await echoes.start(f"echo-{n}"), host="localhost")
        await register(stub, 3, await echoes.start("echo-3"))  # beside an IP literal
        write_bootstrap(registry.address, tmp_path / "bootstrap.json")
        client = Client(tmp_path / "bootstrap.json")
        try:
            await client.wait_for(
                lambda: {a for _, a in client.lines} >= {"echo-1", "echo-2", "echo-3"},
                20,
                "calls to all three",
            )
            assert not [a for _, a in client.lines if a.startswith("ERR")]
            assert not [r for r in caplog.records if "rejected" in r.getMessage()]  # no NACK
        finally:
            await client.close()


def _instance(n: int, **fields: Any) -> Instance:
    spec = InstanceSpec(
        f"echo-{n}", "echo", f"10.0.0.{n}:{8000 + n}", weight=fields.pop("weight", 100),
        zone=fields.pop("zone", ""),
    )  # fmt: skip
    return Instance(spec, lease_id=f"lease-{n}", ttl=10.0, **fields)


def test_resources_are_what_grpcs_xds_client_validates() -> None:
    listener = resources.listener("echo")
    assert listener.name == "echo"
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    assert manager.rds.route_config_name == "echo"
    assert manager.rds.config_source.HasField("ads")
    router = manager.http_filters[-1].typed_config
    assert router.type_url.endswith("envoy.extensions.filters.http.router.v3.Router")

    route = resources.route_config("echo")
    (host,) = route.virtual_hosts
    assert route.name == "echo" and list(host.domains) == ["*"]
    assert host.routes[0].match.prefix == "" and host.routes[0].route.cluster == "echo"

    cluster = resources.cluster("echo")
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert not cluster.HasField("transport_socket")  # a plaintext mesh

    members = [
        _instance(1, zone="a", weight=5),
        _instance(2, zone="a", status=ServingStatus.DRAINING),
        _instance(3, zone="b", lease_ok=False),
        _instance(4, zone="b", status=ServingStatus.NOT_SERVING),
        _instance(5, zone="b", weight=7),
    ]
    cla = resources.load_assignment("echo", members)
    assert cla.cluster_name == "echo"
    zones = {loc.locality.zone: loc for loc in cla.endpoints}
    assert set(zones) == {"a", "b"}
    # A zone weighs what its routable instances weigh.
    weights = [zones[zone].load_balancing_weight.value for zone in ("a", "b")]
    assert weights == [5, 7]
    seen = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value,
         e.health_status, e.load_balancing_weight.value)
        for loc in cla.endpoints for e in loc.lb_endpoints
    ]  # fmt: skip
    assert seen == [
        ("10.0.0.1", 8001, Health.HEALTHY, 5),
        ("10.0.0.2", 8002, Health.DRAINING, 100),
        ("10.0.0.3", 8003, Health.UNHEALTHY, 100),
        ("10.0.0.4", 8004, Health.UNHEALTHY, 100),
        ("10.0.0.5", 8005, Health.HEALTHY, 7),
    ]


def test_an_mtls_meshs_clusters_call_on_mtls_to_the_services_own_identity() -> None:
    cluster = resources.cluster("echo", trust_domain="shoal.local")
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(context)
    common = context.common_tls_context
    # Certificates from the provider instance the bootstrap defines, not from files.
    assert common.tls_certificate_provider_instance.instance_name == "shoal"
    validation = common.validation_context
    assert validation.ca_certificate_provider_instance.instance_name == "shoal"
    assert [m.exact for m in validation.match_subject_alt_names] == [
        "spiffe://shoal.local/svc/echo"
    ]
