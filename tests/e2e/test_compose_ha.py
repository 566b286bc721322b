"""The HA compose mesh (docker-compose.ha.yml) under faults of its etcd cluster and its
registry replicas: the etcd leader killed, a registry replica killed, an etcd member
partitioned, every etcd member stopped; and compose down leaving nothing behind.

Each test runs under steady load through the client sidecar and asserts that no call
failed and no instance was lost. The tests share one mesh, run in file order, and each
leaves it whole again.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest

from identity.spiffe import SpiffeId
from protos import registry_pb2 as rpb
from protos import registry_pb2_grpc as rpb_grpc
from shoal_core.tls import channel_credentials, target_options
from tests.e2e.conftest import HAComposeMesh
from tests.e2e.inside import metric, proxyless
from tests.e2e.load import Load, served, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

WORKERS = {f"worker@worker{n}:7900" for n in (1, 2, 3)}
MEMBERS = ("etcd1", "etcd2", "etcd3")
TTL = 3.0  # docker/compose/sidecar.yaml
# Polling the registry from the host, and docker's own delay in starting a container.
SLACK = 1.0


async def mesh_ready(mesh: HAComposeMesh) -> None:
    await wait_until(cluster_healthy(mesh), 60, "the etcd cluster to have 3 healthy members")
    await wait_until(lambda: mesh.healthy_workers() == WORKERS, 120, "every worker registered")
    await wait_until(
        lambda: set(served(mesh.client_admin)) >= WORKERS, 60, "the client sidecar to see all"
    )


def _etcdctl(
    mesh: HAComposeMesh,
    *args: str,
    via: str | None = None,
    endpoints: str = "https://127.0.0.1:2379",
) -> str:
    """``etcdctl ARGS`` in a member's container (the first one that answers, or ``via``)."""
    for member in [via] if via else MEMBERS:
        got = subprocess.run(
            ["docker", "exec", mesh.container(member), "etcdctl", "--command-timeout", "2s",
             "--endpoints", endpoints, *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if got.returncode == 0:
            return got.stdout
    raise AssertionError(f"etcdctl {' '.join(args)}: no member answered")


def etcd_leader(mesh: HAComposeMesh, among: tuple[str, ...] = MEMBERS) -> str:
    """The service name of the etcd leader, as the members ``among`` report it."""
    endpoints = ",".join(f"https://{m}:2379" for m in among)
    status = json.loads(
        _etcdctl(mesh, "endpoint", "status", "-w", "json", via=among[0], endpoints=endpoints)
    )
    leaders = {s["Status"]["leader"] for s in status}
    assert len(leaders) == 1 and 0 not in leaders, status
    (leader,) = leaders
    for s in status:
        if s["Status"]["header"]["member_id"] == leader:
            # "https://etcd2:2379" -> "etcd2"
            return str(s["Endpoint"]).split("//")[1].split(":")[0]
    raise AssertionError(f"the leader {leader} is not among {among}: {status}")


def cluster_healthy(mesh: HAComposeMesh, via: str | None = None) -> Callable[[], bool]:
    """A check: every one of the 3 members answers healthy (a leader, a quorum)."""

    def check() -> bool:
        try:
            out = _etcdctl(mesh, "endpoint", "health", "--cluster", "-w", "json", via=via)
        except AssertionError:
            return False
        health = json.loads(out)
        return len(health) == len(MEMBERS) and all(m["health"] for m in health)

    return check


def _registry_stub(
    mesh: HAComposeMesh, registry: str
) -> tuple[grpc.Channel, rpb_grpc.RegistryStub]:
    operator = mesh.operator
    assert operator is not None
    expected = SpiffeId(operator.identity.trust_domain, "registry")
    channel = grpc.secure_channel(
        registry, channel_credentials(operator), options=target_options(expected)
    )
    return channel, rpb_grpc.RegistryStub(channel)


def register_probe(mesh: HAComposeMesh) -> bool:
    """Register a new instance (as an operator) through whichever replica answers, then
    deregister it: True once both went through."""
    for registry in mesh.registries:
        channel, stub = _registry_stub(mesh, registry)
        with channel:
            try:
                name = f"probe-{uuid.uuid4().hex[:6]}"
                instance = rpb.Instance(
                    instance_id=f"{name}@{name}:1", service=name, address=f"{name}:1"
                )
                got = stub.Register(rpb.RegisterRequest(instance=instance, ttl_ms=3000), timeout=2)
                stub.Deregister(rpb.DeregisterRequest(lease_id=got.lease_id), timeout=2)
                return True
            except grpc.RpcError:
                continue
    return False


class Watchdog:
    """Polls the registry (either replica) in a thread until stopped and keeps every
    answer that did not list exactly the three workers: instances lost or lapsed."""

    def __init__(self, mesh: HAComposeMesh) -> None:
        self._mesh = mesh
        self._stop = threading.Event()
        self.samples = 0
        self.lost: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                seen = self._mesh.healthy_workers()
            except grpc.RpcError as exc:
                # Reads are served from the replicas' mirrors: one must always answer.
                self.lost.append(f"no replica answered: {exc.code().name}")
            else:
                self.samples += 1
                if seen != WORKERS:
                    self.lost.append(f"listed {sorted(seen)}")
            self._stop.wait(0.25)

    @contextmanager
    def running(self) -> Iterator[Watchdog]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


def _docker(*args: str) -> None:
    subprocess.run(["docker", *args], check=True, capture_output=True, timeout=60)


async def test_calls_flow_through_the_ha_mesh(ha_compose_mesh: HAComposeMesh) -> None:
    mesh = ha_compose_mesh
    await mesh_ready(mesh)
    before = served(mesh.client_admin)
    async with Load(mesh.client, callers=2) as load:
        await wait_until(lambda: load.ok >= 150, 60, "150 calls")
    after = served(mesh.client_admin)
    assert load.failed == [], load.failed[:5]
    assert all(after[w] - before.get(w, 0) > 0 for w in WORKERS), (before, after)
    # Both replicas answer, with the same instances (one state, in etcd).
    assert mesh.operator is not None
    for registry in mesh.registries:
        channel, stub = _registry_stub(mesh, registry)
        with channel:
            found = stub.Discover(rpb.DiscoverRequest(service="worker"), timeout=5)
        assert {i.instance_id for i in found.instances} == WORKERS, registry


async def test_killing_the_etcd_leader_fails_no_call_and_loses_no_instance(
    ha_compose_mesh: HAComposeMesh,
) -> None:
    mesh = ha_compose_mesh
    await mesh_ready(mesh)
    leader = etcd_leader(mesh)
    victim = mesh.container(leader)
    others = [m for m in MEMBERS if m != leader]
    async with Load(mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        with Watchdog(mesh).running() as watchdog:
            _docker("kill", victim)
            killed = time.monotonic()
            # A new instance can register within 5 s of the leader's death.
            await wait_until(lambda: register_probe(mesh), 5, "a new instance to register")
            registered_after = time.monotonic() - killed
            new_leader = etcd_leader(mesh, tuple(others))
            mark = load.ok
            await wait_until(lambda: load.ok >= mark + 100, 30, "load after the kill")
        _docker("start", victim)
        await wait_until(cluster_healthy(mesh, via=others[0]), 60, "the member to rejoin")
        mark = load.ok
        await wait_until(lambda: load.ok >= mark + 50, 30, "load after the rejoin")
    print(
        f"etcd leader {leader} killed: {new_leader} leads, a new instance registered "
        f"{registered_after:.1f}s after; {watchdog.samples} registry samples"
    )
    assert new_leader != leader
    assert load.failed == [], load.failed[:5]
    assert watchdog.lost == [], watchdog.lost[:5]


async def test_killing_a_registry_replica_fails_no_call_and_watches_resume(
    ha_compose_mesh: HAComposeMesh,
) -> None:
    mesh = ha_compose_mesh
    await mesh_ready(mesh)
    first, second = mesh.registries
    # A watcher of registry1 (as the sidecars are, some of them): its last revision.
    channel, stub = _registry_stub(mesh, first)
    with channel:
        stream = stub.Watch(rpb.WatchRequest(service="worker"), timeout=10)
        snapshot = next(iter(stream))
        stream.cancel()
    assert snapshot.type == rpb.WatchEvent.SNAPSHOT
    registry1 = mesh.container("registry1")
    async with Load(mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        with Watchdog(mesh).running() as watchdog:
            _docker("kill", registry1)
            mark = load.ok
            await wait_until(lambda: load.ok >= mark + 100, 30, "load after the kill")
            # Heartbeats go to registry2 now: over two TTLs, no lease may lapse.
            await asyncio.sleep(2 * TTL)
            # The watch moves to registry2 and resumes: the missed events, no snapshot.
            channel, stub = _registry_stub(mesh, second)
            with channel:
                stream = stub.Watch(
                    rpb.WatchRequest(service="worker", since_revision=snapshot.revision),
                    timeout=15,
                )
                resumed = next(iter(stream))
                stream.cancel()
        _docker("start", registry1)
        await wait_until(lambda: _healthy_container(registry1), 60, "registry1 to serve again")
        mark = load.ok
        await wait_until(lambda: load.ok >= mark + 50, 30, "load after registry1 is back")
    print(
        f"registry1 killed: resumed on registry2 with {rpb.WatchEvent.Type.Name(resumed.type)} "
        f"at {resumed.revision} (from {snapshot.revision}); {watchdog.samples} samples"
    )
    assert resumed.type != rpb.WatchEvent.SNAPSHOT, resumed
    assert resumed.revision >= snapshot.revision
    assert load.failed == [], load.failed[:5]
    assert watchdog.lost == [], watchdog.lost[:5]


def _healthy_container(cid: str) -> bool:
    got = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Health.Status}}", cid],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return got.stdout.strip() == "healthy"


async def test_a_partitioned_etcd_member_heals(ha_compose_mesh: HAComposeMesh) -> None:
    mesh = ha_compose_mesh
    await mesh_ready(mesh)
    network = mesh.network()
    # A follower: the registries' etcd client may be talking to it.
    member = next(m for m in MEMBERS if m != etcd_leader(mesh))
    cid = mesh.container(member)
    others = [m for m in MEMBERS if m != member]
    async with Load(mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        with Watchdog(mesh).running() as watchdog:
            _docker("network", "disconnect", network, cid)
            try:
                await asyncio.sleep(2 * TTL)
                mark = load.ok
                await wait_until(lambda: load.ok >= mark + 100, 30, "load while partitioned")
                # The two others keep a quorum: an instance can still register.
                await wait_until(lambda: register_probe(mesh), 10, "a register while partitioned")
            finally:
                _docker("network", "connect", "--alias", member, network, cid)
            await wait_until(cluster_healthy(mesh, via=others[0]), 60, "all 3 healthy again")
            mark = load.ok
            await wait_until(lambda: load.ok >= mark + 50, 30, "load after healing")
    print(f"{member} partitioned for {2 * TTL:g}s and healed; {watchdog.samples} samples")
    assert load.failed == [], load.failed[:5]
    assert watchdog.lost == [], watchdog.lost[:5]


async def test_calls_flow_while_every_etcd_member_is_stopped(
    ha_compose_mesh: HAComposeMesh,
) -> None:
    mesh = ha_compose_mesh
    await mesh_ready(mesh)
    members = [mesh.container(m) for m in MEMBERS]
    async with Load(mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        # Reads keep answering from the replicas' mirrors (fail-static) throughout.
        with Watchdog(mesh).running() as watchdog:
            _docker("stop", "-t", "2", *members)
            try:
                mark = load.ok
                await asyncio.sleep(5)
                flowed = load.ok - mark
            finally:
                _docker("start", *members)
        # etcd is back once its members have a leader again; from then, one TTL.
        await wait_until(cluster_healthy(mesh), 60, "etcd to be back")
        back = time.monotonic()
        await wait_until(
            lambda: mesh.healthy_workers() == WORKERS, TTL + SLACK, "every instance registered"
        )
        registered_after = time.monotonic() - back
        mark = load.ok
        await wait_until(lambda: load.ok >= mark + 50, 30, "load after etcd's return")
    print(
        f"etcd stopped 5s: {flowed} calls meanwhile; every instance registered "
        f"{registered_after:.1f}s after etcd's return; {watchdog.samples} registry samples"
    )
    assert flowed > 50, "calls stopped while etcd was down"
    assert load.failed == [], load.failed[:5]
    # Fail-static: the replicas went on listing every instance from their mirrors.
    assert watchdog.lost == [], watchdog.lost[:5]


def test_etcd_refuses_callers_without_a_certificate_of_its_ca(
    ha_compose_mesh: HAComposeMesh,
) -> None:
    """From inside the compose network (etcd1's container), with etcd's CA but no
    client pair, over TLS and in plaintext: no member answers, where the member's own
    pair (what ETCDCTL_* give) is answered."""
    container = ha_compose_mesh.container("etcd1")

    def get(*env: str, endpoint: str = "https://etcd2:2379") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "exec", *(a for e in env for a in ("-e", e)), container, "etcdctl",
             "--command-timeout", "3s", "--endpoints", endpoint, "get", "/shoal/", "--prefix",
             "--keys-only"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    assert get().returncode == 0, get().stderr
    refused = get("ETCDCTL_CERT=", "ETCDCTL_KEY=")
    assert refused.returncode != 0 and "/shoal/" not in refused.stdout, refused
    plain = get("ETCDCTL_CERT=", "ETCDCTL_KEY=", "ETCDCTL_CACERT=", endpoint="http://etcd2:2379")
    assert plain.returncode != 0 and "/shoal/" not in plain.stdout, plain


def _xds_streams(mesh: HAComposeMesh, service: str) -> float:
    """The ADS streams ``service`` (a registry replica) serves, from its metrics."""
    return metric(mesh.container(service), 7703, "shoal_registry_xds_streams")


async def test_a_proxyless_client_moves_to_the_other_replica_and_fails_no_call(
    ha_compose_mesh: HAComposeMesh,
) -> None:
    mesh = ha_compose_mesh
    await mesh_ready(mesh)
    # It reads xDS from "registry", the name both replicas answer to.
    client = proxyless(mesh.container("client-sidecar"), "x", seconds=40)
    try:
        names = ("registry1", "registry2")
        await wait_until(
            lambda: any(_xds_streams(mesh, r) for r in names), 30, "the client's ADS stream"
        )
        holder = next(r for r in names if _xds_streams(mesh, r))
        other = next(r for r in names if r != holder)
        victim = mesh.container(holder)
        _docker("kill", victim)
        await wait_until(lambda: _xds_streams(mesh, other) >= 1, 30, f"its stream on {other}")
        _docker("start", victim)
        await wait_until(lambda: _healthy_container(victim), 60, f"{holder} to serve again")
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, (out[-2000:], err[-3000:])
    lines = out.splitlines()
    failed = [line for line in lines if line != "X"]
    print(f"proxyless across the loss of {holder}: {len(lines)} calls, {len(failed)} failed")
    assert failed == [], failed[:5]
    assert len(lines) >= 100


def test_compose_down_leaves_nothing(ha_compose_mesh: HAComposeMesh) -> None:
    assert ha_compose_mesh.leftovers()  # the mesh is up, so the check can see things
    ha_compose_mesh.run("down", "-v", "--remove-orphans", "-t", "10")
    assert ha_compose_mesh.leftovers() == []
