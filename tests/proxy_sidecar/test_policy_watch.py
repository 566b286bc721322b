"""``PolicyWatch``: the registry's policy followed over a real data plane's calls.

A real ``DataPlane`` (with a control plane that routes nothing: only its own calls are
made) and real registries, stopped and restarted on the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from shoal_dataplane import DataPlane, Refusal

from identity.authz import Policy, parse_policy
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from proxy_sidecar.authz import PolicyWatch
from proxy_sidecar.rpc import Rpc
from registry_service import RegistryServer
from shoal_core.backoff import Backoff
from shoal_core.policy_wire import policy_to_pb
from tests.proxy_sidecar.conftest import FAST_REGISTRY, wait_for

CLIENT = "spiffe://shoal.local/svc/client"
ROGUE = "spiffe://shoal.local/svc/rogue"
EXEC = "/shoal.worker.v1.Worker/Exec"
CLIENT_ONLY = parse_policy(
    "default: deny\nrules:\n  - {name: client-worker, from: [client], to: worker}\n"
)
NO_EXEC = parse_policy(
    "rules:\n  - {name: no-exec, from: ['*'], to: worker, "
    "methods: [/shoal.worker.v1.Worker/Exec], action: deny}\n"
)
QUICK = Backoff(initial=0.05, maximum=0.2)


class _OwnCallsOnly:
    """The data plane's control plane, for a data plane that only makes our own calls."""

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Sequence[tuple[str, str]],
        remaining: float | None,
        peer: str | None,
    ) -> Refusal:
        return Refusal(12, "not routing in this test")

    def connection_state(self, address: str, state: str) -> None:
        return None


@pytest.fixture
async def rpc() -> AsyncIterator[Rpc]:
    dataplane = DataPlane(_OwnCallsOnly())
    dataplane.start("127.0.0.1:0")
    rpc = Rpc(dataplane)
    try:
        yield rpc
    finally:
        await asyncio.to_thread(dataplane.stop, 0.0)
        rpc.close()


@contextlib.asynccontextmanager
async def watching(rpc: Rpc, address: str, initial_sync: float = 2.0) -> AsyncIterator[PolicyWatch]:
    watch = PolicyWatch(rpc, address, backoff=QUICK, initial_sync=initial_sync)
    await watch.start()
    try:
        yield watch
    finally:
        await watch.close()


async def _set(address: str, policy: Policy) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.RegistryStub(channel).SetPolicy(
            pb.SetPolicyRequest(policy=policy_to_pb(policy)), timeout=5
        )
    return int(reply.version)


async def test_the_policy_is_followed_and_a_change_applies_within_a_second(
    rpc: Rpc, registry: RegistryServer
) -> None:
    await _set(registry.address, CLIENT_ONLY)
    async with watching(rpc, registry.address) as watch:
        # start() waited for the policy: no call is decided before it is known.
        assert watch.policy == CLIENT_ONLY and watch.connected
        assert watch.decide(CLIENT, "worker", EXEC).allowed
        denied = watch.decide(ROGUE, "worker", EXEC)
        assert (denied.allowed, denied.reason) == (False, "the mesh default (deny)")
        assert not watch.decide(None, "worker", EXEC).allowed
        for _ in range(2):
            watch.decide(ROGUE, "worker", EXEC)
        assert watch.denied_counts() == {(ROGUE, "worker"): 3, ("", "worker"): 1}
        assert watch.denial_message(ROGUE, "worker", EXEC, denied) == (
            f"{ROGUE} may not call {EXEC} on service 'worker': the mesh default (deny)"
        )

        started = time.monotonic()
        version = await _set(registry.address, NO_EXEC)
        await wait_for(lambda: watch.version == version, timeout=1.0, what="the new policy")
        assert time.monotonic() - started < 1.0
        # The decisions cached under the old policy went with it.
        assert not watch.decide(CLIENT, "worker", EXEC).allowed
        assert watch.decide(ROGUE, "worker", "/shoal.worker.v1.Worker/Stats").allowed
        assert watch.decide(CLIENT, "worker", EXEC).reason == "rule 'no-exec' (deny)"


async def test_the_last_policy_is_kept_through_an_outage_and_followed_after_it(
    rpc: Rpc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy_sidecar")
    registry = RegistryServer("127.0.0.1:0", FAST_REGISTRY, policy=CLIENT_ONLY)
    await registry.start()
    address = registry.address
    try:
        async with watching(rpc, address) as watch:
            held = watch.version
            assert watch.policy == CLIENT_ONLY
            await registry.close(grace=0)
            await wait_for(lambda: not watch.connected, what="the watch to break")
            await wait_for(lambda: watch.reconnects >= 3, what="retries against no registry")
            # Fail-static: the outage changed no one's rights.
            assert (watch.policy, watch.version) == (CLIENT_ONLY, held)
            assert not watch.decide(ROGUE, "worker", EXEC).allowed
            assert watch.decide(CLIENT, "worker", EXEC).allowed

            registry = RegistryServer(address, FAST_REGISTRY, policy=NO_EXEC)
            await registry.start()
            await wait_for(lambda: watch.policy == NO_EXEC, what="the restarted registry's")
            assert watch.version != held and watch.connected
            assert not watch.decide(CLIENT, "worker", EXEC).allowed
            broke = [
                r
                for r in caplog.records
                if "the policy watch at" in r.getMessage() and "broke off" in r.getMessage()
            ]
            assert len(broke) == 1, "each outage is said once, not once per retry"
            assert any("following the policy watch at" in r.getMessage() for r in caplog.records)
    finally:
        await registry.close(grace=0)


async def test_until_a_policy_arrives_everything_is_allowed(rpc: Rpc) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    async with watching(rpc, nobody, initial_sync=0.3) as watch:
        assert 0.3 <= time.monotonic() - started < 2.0
        assert watch.policy is None and not watch.connected
        decision = watch.decide(ROGUE, "worker", EXEC)
        assert (decision.allowed, decision.reason) == (True, "the mesh default (allow)")
        assert watch.denied_counts() == {}
        # The registry comes up later on that address: its policy then applies.
        registry = RegistryServer(nobody, FAST_REGISTRY, policy=CLIENT_ONLY)
        await registry.start()
        try:
            await wait_for(lambda: watch.policy == CLIENT_ONLY, what="the first policy")
            assert not watch.decide(ROGUE, "worker", EXEC).allowed
        finally:
            await registry.close(grace=0)
