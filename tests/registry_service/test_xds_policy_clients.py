"""The sidecar's policies served over xDS, as plain grpcio clients (processes of their
own, ``xds_client.py``) live them: ring hash keeps a key on one instance, retries hide
an instance that dies under load, and a file using every mapped field is accepted."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar.config import SidecarConfig
from registry_service.xds.policy import XdsPolicies, translate
from tests.registry_service.conftest import StartRegistry
from tests.registry_service.test_xds import Client, Echoes, register, write_bootstrap

NAMES = {"echo-1", "echo-2", "echo-3"}


@pytest.fixture
async def echoes() -> AsyncIterator[Echoes]:
    started = Echoes()
    yield started
    await started.close()


def policies(echo: dict[str, Any], **top: Any) -> XdsPolicies:
    served, _ = translate(SidecarConfig.model_validate({"services": {"echo": echo}, **top}))
    return served


def no_nack(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if "rejected" in r.getMessage()]


async def mesh(
    start_registry: StartRegistry, echoes: Echoes, served: XdsPolicies, delay: float = 0.0
) -> tuple[str, Any]:
    registry = await start_registry(xds_policies=served)
    channel = grpc.aio.insecure_channel(registry.address)
    stub = pb_grpc.RegistryStub(channel)
    for n in (1, 2, 3):
        await register(stub, n, await echoes.start(f"echo-{n}", delay))
    return registry.address, channel


async def test_ring_hash_keeps_each_key_on_one_instance(
    start_registry: StartRegistry, echoes: Echoes, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    served = policies({"lb": "consistent_hash", "hash_key": "x-key"})
    address, channel = await mesh(start_registry, echoes, served)
    keys = [f"k{i}" for i in range(1, 9)]
    try:
        write_bootstrap(address, tmp_path / "bootstrap.json")
        client = Client(tmp_path / "bootstrap.json", ",".join(keys))
        try:
            await client.wait_for(lambda: len(client.lines) >= 160, 30, "160 calls")
        finally:
            await client.close()
        reached: dict[str, set[str]] = defaultdict(set)
        for _, answer in client.lines:
            name, _, key = answer.rpartition(" ")
            reached[key].add(name)
        assert set(reached) == set(keys), reached
        # k1 (and every other key) on one instance; the keys over more than one.
        assert all(len(names) == 1 for names in reached.values()), reached
        assert len(set().union(*reached.values())) > 1, reached
        assert set().union(*reached.values()) <= NAMES, reached  # no ERR lines either
        assert no_nack(caplog)
    finally:
        await channel.close()


async def test_retries_hide_an_instance_killed_under_load(
    start_registry: StartRegistry, echoes: Echoes, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The sidecar's defaults (3 attempts, UNAVAILABLE); each call takes 50 ms, so calls
    # are in flight on the instance when it goes.
    served = policies({"retry": {"max_attempts": 3}})
    address, channel = await mesh(start_registry, echoes, served, delay=0.05)
    try:
        write_bootstrap(address, tmp_path / "bootstrap.json")
        client = Client(tmp_path / "bootstrap.json", "", "4")
        try:
            await client.wait_for(
                lambda: {a for _, a in client.lines} >= NAMES, 20, "calls to all three"
            )
            killed = time.time()
            # Still registered, lease and all: only the clients' retries stand between
            # the dead server and a failed call.
            await echoes.by_name["echo-2"].stop(0)
            await client.wait_for(lambda: client.lines[-1][0] > killed + 2.0, 10, "calls after")
        finally:
            await client.close()
        answers = [a for _, a in client.lines]
        assert not [a for a in answers if a.startswith("ERR")], answers
        assert {a for at, a in client.lines if at > killed + 1.0} == {"echo-1", "echo-3"}
        assert no_nack(caplog)
    finally:
        await channel.close()


async def test_every_mapped_field_is_accepted_by_grpc(
    start_registry: StartRegistry, echoes: Echoes, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # least_request (falls back to round robin in grpcio), breaker, outlier detection,
    # an idempotent method's route of its own with more retry codes.
    served = policies(
        {
            "lb": "least_request",
            "retry": {
                "retry_on": ["RESOURCE_EXHAUSTED", "INTERNAL"],
                "idempotent_methods": ["Who"],
                "backoff_base": 0.01,
                "backoff_max": 0.1,
            },
            "circuit_breaker": {"max_in_flight": 100},
        },
        outlier={"consecutive_failures": 3, "base_ejection": 5, "max_ejected_percent": 34},
    )
    address, channel = await mesh(start_registry, echoes, served)
    try:
        write_bootstrap(address, tmp_path / "bootstrap.json")
        client = Client(tmp_path / "bootstrap.json")
        try:
            await client.wait_for(lambda: len(client.lines) >= 60, 20, "60 calls")
        finally:
            await client.close()
        assert {a for _, a in client.lines} == NAMES  # spread, and no ERR
        assert no_nack(caplog)
    finally:
        await channel.close()
