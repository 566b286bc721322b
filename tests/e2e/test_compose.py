"""The compose mesh under faults: kill, partition, registry restart, scale-out, teardown.

The tests share one mesh and run in file order; each leaves it whole again.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from tests.e2e.conftest import ALL_FILES, ComposeMesh
from tests.e2e.load import Load, healthy_workers, served, wait_until

# Building the image (about 2 minutes on a fresh machine) counts towards the first test.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

WORKERS = {f"worker@worker{n}:7900" for n in (1, 2, 3)}
TTL, SWEEP = 3.0, 0.5  # docker/compose/sidecar.yaml and docker-compose.yml


async def mesh_ready(mesh: ComposeMesh, workers: set[str] = WORKERS) -> None:
    await wait_until(
        lambda: healthy_workers(mesh.registry) == workers,
        120,
        f"registry to list {sorted(workers)}",
    )
    await wait_until(
        lambda: set(served(mesh.client_admin)) >= workers,
        60,
        "the client sidecar to see every worker",
    )


async def test_calls_through_the_client_sidecar_reach_all_three(compose_mesh: ComposeMesh) -> None:
    await mesh_ready(compose_mesh)
    before = served(compose_mesh.client_admin)
    async with Load(compose_mesh.client, callers=2) as load:
        await wait_until(lambda: load.ok >= 150, 60, "150 calls")
    after = served(compose_mesh.client_admin)
    assert not load.failed
    assert all(after[w] - before.get(w, 0) > 0 for w in WORKERS), (before, after)
    # The app container reaches the mesh through its own sidecar on its loopback.
    inside = compose_mesh.run(
        "exec",
        "-T",
        "client",
        "shoal",
        "call",
        "upper",
        "--data",
        "from the client app",
        "--via",
        "127.0.0.1:7701",
    )
    assert inside.stdout == "FROM THE CLIENT APP"


async def test_killing_a_worker_under_load_fails_no_call(compose_mesh: ComposeMesh) -> None:
    await mesh_ready(compose_mesh)
    victims = [compose_mesh.container("worker2-sidecar"), compose_mesh.container("worker2")]
    async with Load(compose_mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        subprocess.run(["docker", "kill", *victims], check=True, capture_output=True)
        killed = time.monotonic()
        await wait_until(
            lambda: "worker@worker2:7900" not in healthy_workers(compose_mesh.registry),
            30,
            "the registry to drop worker2",
        )
        dropped_after = time.monotonic() - killed
        calls_at_drop = load.ok
        await wait_until(lambda: load.ok >= calls_at_drop + 100, 30, "load after the drop")
    assert load.failed == [], load.failed[:5]
    # Within TTL + one sweep of its last heartbeat (plus polling and docker's own delay).
    assert dropped_after <= TTL + SWEEP + 2.0, dropped_after
    compose_mesh.run("up", "-d", "worker2", "worker2-sidecar")
    await mesh_ready(compose_mesh)


async def test_a_partitioned_worker_loses_traffic_and_regains_it(compose_mesh: ComposeMesh) -> None:
    await mesh_ready(compose_mesh)
    network, worker3 = compose_mesh.network(), compose_mesh.container("worker3")
    target = "worker@worker3:7900"
    async with Load(compose_mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        subprocess.run(["docker", "network", "disconnect", network, worker3], check=True)
        # Once it is ejected or lapsed, worker3 gets nothing more.
        await wait_until(
            lambda: target not in healthy_workers(compose_mesh.registry),
            30,
            "worker3's lease to lapse",
        )
        # The client sidecar drops it from its set (or keeps it ejected): no more calls.
        frozen = served(compose_mesh.client_admin).get(target, 0)
        mark = load.ok
        await wait_until(lambda: load.ok >= mark + 100, 30, "load while partitioned")
        assert served(compose_mesh.client_admin).get(target, 0) == frozen
        subprocess.run(
            ["docker", "network", "connect", "--alias", "worker3", network, worker3], check=True
        )
        await wait_until(
            lambda: target in healthy_workers(compose_mesh.registry),
            60,
            "worker3 to register again",
        )
        await wait_until(
            lambda: target in served(compose_mesh.client_admin),
            30,
            "the client sidecar to see worker3 again",
        )
        back = served(compose_mesh.client_admin)[target]
        await wait_until(
            lambda: served(compose_mesh.client_admin)[target] > back,
            60,
            "traffic to return to worker3",
        )
    # Calls in flight to worker3 when the link went were retried elsewhere, within limits.
    assert len(load.failed) <= 10, load.failed[:5]


async def test_calls_flow_while_the_registry_restarts(compose_mesh: ComposeMesh) -> None:
    await mesh_ready(compose_mesh)
    async with Load(compose_mesh.client) as load:
        await wait_until(lambda: load.ok >= 50, 30, "steady load")
        restart = asyncio.create_task(
            asyncio.to_thread(compose_mesh.run, "restart", "-t", "5", "registry")
        )
        mark = load.ok
        await restart
        assert load.ok > mark, "no call completed while the registry restarted"
        # Every instance registers again (heartbeat -> NOT_FOUND -> register).
        await wait_until(
            lambda: healthy_workers(compose_mesh.registry) == WORKERS,
            60,
            "every worker to be registered again",
        )
    assert load.failed == [], load.failed[:5]


async def test_a_fourth_worker_takes_traffic_within_seconds(compose_mesh: ComposeMesh) -> None:
    await mesh_ready(compose_mesh)
    compose_mesh.run("up", "-d", "worker4", "worker4-sidecar", files=ALL_FILES)
    fourth = "worker@worker4:7900"
    async with Load(compose_mesh.client) as load:
        took = await wait_until(
            lambda: served(compose_mesh.client_admin).get(fourth, 0) > 0,
            60,
            "worker4 to take traffic",
        )
    assert load.failed == [], load.failed[:5]
    print(f"worker4 took traffic {took:.1f}s after its containers were up")


def test_compose_down_leaves_nothing(compose_mesh: ComposeMesh) -> None:
    assert compose_mesh.leftovers()  # the mesh is up, so the check can see things
    compose_mesh.run("down", "-v", "--remove-orphans", "-t", "10", files=ALL_FILES)
    assert compose_mesh.leftovers() == []
