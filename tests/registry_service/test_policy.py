"""The mesh's authorization policy at the registry: SetPolicy, GetPolicy, WatchPolicy.

Real registries on 127.0.0.1:0: plaintext for the protocol, mTLS with real
certificates for who may set it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from identity.authz import Policy, parse_policy
from identity.ca import init_ca
from identity.spiffe import SpiffeId
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryServer
from registry_service.access import Access, PermissionDenied, Unauthenticated
from registry_service.policy_store import PolicyStore
from shoal_core.config import ConfigError
from shoal_core.policy_wire import policy_from_pb, policy_to_pb
from shoal_core.tls import channel_credentials, server_credentials, target_options
from tests.mesh_identity import TD, credentials
from tests.registry_service.conftest import FAST

DENY_ALL = parse_policy("default: deny")
CLIENT_ONLY = parse_policy(
    "default: deny\nrules:\n  - {name: c, from: [client], to: worker, "
    "methods: ['/shoal.worker.v1.Worker/*']}\n"
)
REGISTRY = SpiffeId(TD, "registry")


async def _next(call, timeout: float = 5.0) -> pb.Policy:
    msg = await asyncio.wait_for(call.read(), timeout)
    assert isinstance(msg, pb.Policy), "the policy watch ended"
    return msg


async def _set(stub, policy: Policy) -> int:
    reply = await stub.SetPolicy(pb.SetPolicyRequest(policy=policy_to_pb(policy)), timeout=5)
    return int(reply.version)


async def test_set_get_and_watch_follow_each_change_within_a_second(stub) -> None:
    initial = await stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
    # No policy set yet: the mesh allows everything, as it did before policies.
    assert policy_from_pb(initial) == Policy() and initial.version > 0
    watch = stub.WatchPolicy(pb.WatchPolicyRequest(), timeout=30)
    first = await _next(watch)
    assert first.version == initial.version
    versions = [initial.version]
    for policy in (CLIENT_ONLY, DENY_ALL, CLIENT_ONLY):
        started = time.monotonic()
        versions.append(await _set(stub, policy))
        update = await _next(watch, timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert update.version == versions[-1]
        assert policy_from_pb(update) == policy
    assert versions == sorted(set(versions)), "versions must increase with every set"
    got = await stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
    assert (got.version, policy_from_pb(got)) == (versions[-1], CLIENT_ONLY)
    watch.cancel()


async def test_a_watcher_resuming_with_the_current_version_gets_nothing_until_a_change(
    stub,
) -> None:
    version = await _set(stub, CLIENT_ONLY)
    resumed = stub.WatchPolicy(pb.WatchPolicyRequest(known_version=version), timeout=30)
    stale = stub.WatchPolicy(pb.WatchPolicyRequest(known_version=version - 1), timeout=30)
    assert (await _next(stale)).version == version
    # A read that times out would cancel the call, so the read waits in a task.
    pending = asyncio.ensure_future(resumed.read())
    await asyncio.sleep(0.5)
    assert not pending.done(), "sent a policy the watcher already holds"
    newer = await _set(stub, DENY_ALL)
    update = await asyncio.wait_for(pending, 1.0)
    assert isinstance(update, pb.Policy)
    assert (update.version, policy_from_pb(update)) == (newer, DENY_ALL)
    update = await _next(stale, timeout=1.0)
    assert (update.version, policy_from_pb(update)) == (newer, DENY_ALL)
    resumed.cancel()
    stale.cancel()


async def test_an_invalid_policy_is_refused_with_the_field_and_changes_nothing(stub) -> None:
    before = await stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
    bad = {
        "no sources": pb.Policy(rules=[pb.PolicyRule(to="worker")]),
        "a bad method": pb.Policy(
            rules=[pb.PolicyRule(sources=["client"], to="worker", methods=["Exec"])]
        ),
        "a bad action": pb.Policy(
            rules=[pb.PolicyRule(sources=["client"], to="worker", action="maybe")]
        ),
        "a bad default": pb.Policy(default_action="sometimes"),
    }
    fields = ["rules.0.from", "rules.0.methods.0", "rules.0.action", "default"]
    for (what, policy), field in zip(bad.items(), fields, strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SetPolicy(pb.SetPolicyRequest(policy=policy), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert (caught.value.details() or "").startswith(f"policy: {field}: "), what
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetPolicy(pb.SetPolicyRequest(), timeout=5)
    assert caught.value.details() == "policy: is required"
    assert await stub.GetPolicy(pb.GetPolicyRequest(), timeout=5) == before


async def test_policy_watches_end_cleanly_when_the_registry_stops(start_registry) -> None:
    registry = await start_registry(FAST)
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        watches = [stub.WatchPolicy(pb.WatchPolicyRequest()) for _ in range(3)]
        for watch in watches:
            await _next(watch)
        assert registry.policies.watchers == 3
        started = time.monotonic()
        await registry.close(grace=10)
        # Ended by the registry, not cut when the 10 s grace ran out.
        assert time.monotonic() - started < 5
        for watch in watches:
            assert await watch.read() is grpc.aio.EOF  # type: ignore[attr-defined]
            assert await watch.code() == grpc.StatusCode.OK


async def test_the_registry_starts_with_the_policy_it_is_given() -> None:
    async with RegistryServer("127.0.0.1:0", FAST, policy=CLIENT_ONLY) as registry:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            got = await pb_grpc.RegistryStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=5)
    assert policy_from_pb(got) == CLIENT_ONLY


async def test_a_registry_with_a_state_dir_keeps_the_policy_set_across_a_restart(
    tmp_path,
) -> None:
    """Without it a restarted registry would hand every sidecar "allow everything"."""
    state = tmp_path / "state"
    async with RegistryServer("127.0.0.1:0", FAST, state_dir=state) as registry:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            await _set(pb_grpc.RegistryStub(channel), CLIENT_ONLY)
    assert oct((state / "policy.yaml").stat().st_mode & 0o777) == "0o600"
    async with RegistryServer("127.0.0.1:0", FAST, policy=DENY_ALL, state_dir=state) as again:
        async with grpc.aio.insecure_channel(again.address) as channel:
            got = await pb_grpc.RegistryStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=5)
    assert policy_from_pb(got) == CLIENT_ONLY  # the kept one, not the start-up default
    (state / "policy.yaml").write_text("default: perhaps\n")
    with pytest.raises(ConfigError, match="policy.yaml"):
        RegistryServer("127.0.0.1:0", FAST, state_dir=state)


def test_a_slow_watcher_holds_only_the_newest_policy() -> None:
    clock = iter([100, 100, 100, 50])  # the clock standing still, then going back
    store = PolicyStore(clock=lambda: next(clock))
    watcher = store.watch(known_version=store.version)
    versions = [store.set(DENY_ALL), store.set(CLIENT_ONLY), store.set(DENY_ALL)]
    assert versions == [101, 102, 103]

    async def drain() -> list[tuple[int, Policy] | None]:
        first = await watcher.next()
        store.close_all()
        return [first, await watcher.next()]

    assert asyncio.run(drain()) == [(103, DENY_ALL), None]


# --- who may set it ------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path):
    return init_ca(tmp_path / "ca", TD)


@pytest.fixture
async def secure_registry(ca):
    own = credentials(ca, REGISTRY)
    server = RegistryServer(
        "127.0.0.1:0", FAST, credentials=server_credentials(lambda: own), trust_domain=TD
    )
    async with server:
        yield server


def _stub(registry: RegistryServer, ca, who: SpiffeId | str) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.secure_channel(
        registry.address,
        channel_credentials(credentials(ca, who)),
        options=target_options(REGISTRY),
    )
    return channel, pb_grpc.RegistryStub(channel)


async def test_only_an_operator_may_set_the_policy_and_any_service_may_read_it(
    secure_registry, ca
) -> None:
    channel, worker = _stub(secure_registry, ca, "worker")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _set(worker, parse_policy("default: allow"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = caught.value.details() or ""
        assert "spiffe://shoal.local/svc/worker may not set" in details, details
        watch = worker.WatchPolicy(pb.WatchPolicyRequest(), timeout=30)
        assert policy_from_pb(await _next(watch)) == Policy()
        operator = SpiffeId(TD, "operator", "alice")
        op_channel, op = _stub(secure_registry, ca, operator)
        async with op_channel:
            version = await _set(op, CLIENT_ONLY)
        update = await _next(watch, timeout=1.0)
        assert (update.version, policy_from_pb(update)) == (version, CLIENT_ONLY)
        watch.cancel()
        got = await worker.GetPolicy(pb.GetPolicyRequest(), timeout=5)
        assert policy_from_pb(got) == CLIENT_ONLY


def test_setting_needs_an_operator_identity_of_this_mesh() -> None:
    rules = Access(TD)
    with pytest.raises(Unauthenticated):
        rules.operate(None, "set the policy")
    with pytest.raises(Unauthenticated, match="other.test"):
        rules.operate(SpiffeId("other.test", "operator", "alice"), "set the policy")
    with pytest.raises(PermissionDenied, match="svc/client may not set the policy: only operators"):
        rules.operate(SpiffeId.service(TD, "client"), "set the policy")
    with pytest.raises(PermissionDenied):
        rules.operate(REGISTRY, "set the policy")
    rules.operate(SpiffeId(TD, "operator", "alice"), "set the policy")
    Access(None).operate(None, "set the policy")  # --insecure: as a plaintext mesh was
