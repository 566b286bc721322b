"""Pure logic of the control plane the native data plane asks: routing, tries, retries.

Real domain objects throughout (table, router, clusters, balancers, budget); only the
clock is fake. ``Control`` binds the running event loop, so every test is async.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from shoal_dataplane import Admission, Refusal, Target

from proxy_sidecar.balancers import make_balancer
from proxy_sidecar.config import SidecarConfig
from proxy_sidecar.control import Call, Control
from proxy_sidecar.endpoints import Endpoint, EndpointTable, InstanceInfo
from proxy_sidecar.routing import LOCAL_SERVICE, Router
from shoal_core.backoff import Backoff

OK, CANCELLED, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 1, 4, 12, 13, 14
APP = "127.0.0.1:1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(n: int, *services: str) -> InstanceInfo:
    return InstanceInfo(
        instance_id=f"i{n}", address=f"10.0.0.{n}:1", grpc_services=services or ("a.S",)
    )


class Mesh:
    """A synced table of three ``a.S`` instances and two ``b.T`` ones, a router, a control."""

    def __init__(self, config: dict[str, Any] | None = None, *, app: str | None = None) -> None:
        self.clock = Clock()
        self.table = EndpointTable(empty_hold=0.0, clock=self.clock)
        self.table.replace([info(1), info(2), info(3), info(4, "b.T"), info(5, "b.T")])
        self.config = SidecarConfig.model_validate(config or {})
        self.router = Router(self.table, self.config, app=app, clock=self.clock)
        self.seed = 7
        self.control = Control(
            self.router,
            [self.table, self.router.local_table],
            rng=random.Random(self.seed),
            clock=self.clock,
        )

    def begin(
        self,
        path: str = "/a.S/M",
        *,
        target: str | None = None,
        inbound: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        remaining: float | None = None,
        peer: str | None = None,
    ) -> Admission:
        result = self.control.begin(path, target, inbound, list(metadata), remaining, peer)
        assert isinstance(result, Admission), result
        return result

    def start(self, path: str = "/a.S/M", **kw: Any) -> tuple[Call, Target]:
        """A begun call and its first pick (which must be an endpoint, not a refusal)."""
        begun = self.begin(path, **kw)
        return begun.call, picked(begun.first)

    def endpoint(self, address: str) -> Endpoint:
        return next(e for e in self.table.endpoints() if e.address == address)


def picked(pick: Target | Refusal) -> Target:
    assert isinstance(pick, Target), pick
    return pick


def refused(result: Admission | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def services(**policies: Any) -> dict[str, Any]:
    return {"services": {"a.S": policies}}


def all_in_flight(mesh: Mesh) -> list[int]:
    return [e.in_flight for e in mesh.table.endpoints()]


# --- begin -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "/", "a.S/M", "/a.S/", "//M", "/a S/M", "/a.S/M/x"])
async def test_begin_refuses_a_malformed_path(path):
    mesh = Mesh()
    refusal = refused(mesh.control.begin(path, None, False, [], None, None))
    assert refusal.code == UNIMPLEMENTED and "/package.Service/Method" in refusal.message
    assert mesh.router.clusters() == {}


async def test_begin_refuses_an_unknown_service_once_the_table_is_synced():
    mesh = Mesh()
    refusal = refused(mesh.control.begin("/nobody.Serves/M", None, False, [], None, None))
    assert refusal.code == UNIMPLEMENTED and "nobody.Serves" in refusal.message
    # Same through the target override, even on a well-formed path of a known service.
    refusal = refused(mesh.control.begin("/a.S/M", "nobody.Serves", False, [], None, None))
    assert refusal.code == UNIMPLEMENTED and "nobody.Serves" in refusal.message
    assert "nobody.Serves" not in mesh.router.clusters()


async def test_calls_before_the_first_snapshot_are_unavailable_and_hold_nothing():
    clock = Clock()
    table = EndpointTable(empty_hold=0.0, clock=clock)
    router = Router(table, SidecarConfig(), clock=clock)
    control = Control(router, [table], clock=clock)
    # Any well-formed name may be a service the registry will know: none gets a cluster.
    for n in range(500):
        refusal = refused(control.begin(f"/made.Up{n}/M", None, False, [], None, None))
        assert refusal.code == UNAVAILABLE
        assert "registry has not been reached" in refusal.message
    assert router.clusters() == {}
    # Once the registry has answered, known services route and the rest stay unknown.
    table.replace([info(1)])
    assert isinstance(control.begin("/a.S/M", None, False, [], None, None), Admission)
    assert refused(control.begin("/made.Up1/M", None, False, [], None, None)).code == UNIMPLEMENTED
    assert list(router.clusters()) == ["a.S"]


async def test_the_cluster_of_a_service_that_left_the_registry_is_dropped():
    mesh = Mesh()
    call, _ = mesh.start("/b.T/M")
    call.finish(OK, 0.001, 0.001)
    assert "b.T" in mesh.router.clusters()
    mesh.table.remove("i4")
    mesh.table.remove("i5")
    # The next routed call prunes: b.T is unknown now, and its cluster is gone.
    mesh.start("/a.S/M")[0].finish(OK, 0.001, 0.001)
    assert "b.T" not in mesh.router.clusters()
    assert refused(mesh.control.begin("/b.T/M", None, False, [], None, None)).code == UNIMPLEMENTED


async def test_begin_routes_a_known_service_and_picks_its_first_endpoint():
    mesh = Mesh()
    begun = mesh.begin("/a.S/M")
    call = begun.call
    assert isinstance(call, Call) and call.cluster is mesh.router.cluster("a.S")
    assert begun.breaker is call.cluster.breaker
    assert (begun.breaker.max_in_flight, begun.breaker.max_pending) == (1000, 1000)
    assert begun.outbound is True and begun.per_try_timeout is None
    target = picked(begun.first)
    assert target.instance in {"i1", "i2", "i3"}
    assert mesh.endpoint(target.address).target is target
    assert call.cluster.requests == 1


async def test_begin_target_argument_overrides_the_path_service():
    mesh = Mesh()
    for _ in range(6):
        call, target = mesh.start("/a.S/M", target="b.T")
        assert call.cluster.service == "b.T"
        assert target.instance in {"i4", "i5"}
        call.finish(OK, 0.001, 0.001)
    assert mesh.router.cluster("a.S").requests == 0


async def test_inbound_goes_to_the_local_app_not_outbound():
    mesh = Mesh(app=APP)
    # Even for a service nobody in the mesh declares: the app decides.
    for path in ("/a.S/M", "/only.Local/M"):
        begun = mesh.begin(path, inbound=True)
        assert begun.call.cluster is mesh.router.local and begun.outbound is False
        target = picked(begun.first)
        assert (target.address, target.instance) == (APP, LOCAL_SERVICE)
        begun.call.finish(OK, 0.001, 0.001)
    # The same path outbound goes to the mesh.
    begun = mesh.begin("/a.S/M", inbound=False)
    assert begun.outbound is True and picked(begun.first).instance in {"i1", "i2", "i3"}


async def test_inbound_without_a_local_app_is_refused_not_sent_round_the_mesh():
    mesh = Mesh()
    refusal = refused(mesh.control.begin("/a.S/M", None, True, [], None, None))
    assert refusal.code == UNIMPLEMENTED and "no app" in refusal.message
    assert mesh.router.clusters() == {}


async def test_local_app_is_never_retried():
    mesh = Mesh(app=APP)
    call = mesh.begin("/a.S/M", inbound=True).call
    assert call.failed(UNAVAILABLE, True, 0.001) is None
    assert mesh.router.local is not None
    assert [e.in_flight for e in mesh.router.local_table.endpoints()] == [0]


async def test_hash_key_from_metadata_reaches_the_consistent_hash_balancer():
    mesh = Mesh(services(lb="consistent_hash", hash_key="x-key"))
    members = mesh.table.members("a.S") or ()
    expected = make_balancer("consistent_hash").pick(members, "user-42", ())
    assert expected is not None
    seen = set()
    for _ in range(20):
        call, pick = mesh.start(metadata=[("other", "zzz"), ("x-key", "user-42")])
        seen.add(pick.instance)
        call.finish(OK, 0.001, 0.001)
    assert seen == {expected.instance_id}
    # Different keys do spread (so it was the key, not luck, that kept the instance).
    spread = set()
    for n in range(60):
        call, pick = mesh.start(metadata=[("x-key", f"user-{n}")])
        spread.add(pick.instance)
        call.finish(OK, 0.001, 0.001)
    assert len(spread) > 1


async def test_breaker_limits_come_from_the_services_circuit_breaker_settings():
    mesh = Mesh(services(circuit_breaker={"max_in_flight": 7, "max_pending": 3}))
    breaker = mesh.begin("/a.S/M").breaker
    assert (breaker.max_in_flight, breaker.max_pending) == (7, 3)
    # One breaker per cluster, not per call.
    assert mesh.begin("/a.S/N").breaker is breaker
    # Another service keeps the defaults.
    other = mesh.begin("/b.T/M").breaker
    assert (other.max_in_flight, other.max_pending) == (1000, 1000)


# --- pick / failed / finish bookkeeping --------------------------------------------------


async def test_in_flight_rises_on_pick_and_falls_on_failed():
    mesh = Mesh()
    call, target = mesh.start()
    address = target.address
    endpoint = mesh.endpoint(address)
    assert endpoint.in_flight == 1
    assert call.failed(UNAVAILABLE, False, 0.002) is None
    assert endpoint.in_flight == 0
    assert endpoint.requests == 1 and endpoint.failures == 1
    # A second report for the same try must not count it again.
    assert call.failed(UNAVAILABLE, True, 0.002) is None
    assert endpoint.in_flight == 0 and endpoint.requests == 1
    call.finish(UNAVAILABLE, None, 0.01)
    assert all_in_flight(mesh) == [0] * 5
    assert call.cluster.code_counts()["UNAVAILABLE"] == 1


async def test_finish_with_latency_records_a_success_and_counts_the_code():
    mesh = Mesh()
    call, target = mesh.start()
    address = target.address
    endpoint = mesh.endpoint(address)
    assert endpoint.in_flight == 1
    call.finish(OK, 0.04, 0.04)
    assert endpoint.in_flight == 0
    assert endpoint.requests == 1 and endpoint.failures == 0 and endpoint.ewma == 0.04
    assert call.cluster.code_counts() == {"OK": 1}
    # An answered call with an error status still counts the status by name.
    call, target = mesh.start()
    address = target.address
    call.finish(5, 0.01, 0.01)
    assert call.cluster.code_counts() == {"OK": 1, "NOT_FOUND": 1}
    assert mesh.endpoint(address).in_flight == 0
    # Out-of-range codes count as UNKNOWN.
    call, _ = mesh.start()
    call.finish(99, None, 0.01)
    assert call.cluster.code_counts()["UNKNOWN"] == 1
    assert call.cluster.requests == 3


async def test_cancelled_after_pick_releases_the_endpoint_without_recording():
    mesh = Mesh()
    call, target = mesh.start()
    address = target.address
    endpoint = mesh.endpoint(address)
    call.finish(CANCELLED, None, 0.01)
    assert endpoint.in_flight == 0
    assert endpoint.requests == 0 and endpoint.failures == 0
    assert call.cluster.code_counts() == {"CANCELLED": 1}


async def test_cancelled_during_the_backoff_leaves_nothing_in_flight():
    mesh = Mesh()
    call, _ = mesh.start()
    assert call.failed(UNAVAILABLE, True, 0.001) is not None
    call.finish(CANCELLED, None, 0.01)
    assert all_in_flight(mesh) == [0] * 5
    assert call.cluster.code_counts() == {"CANCELLED": 1}


# --- retry decisions ---------------------------------------------------------------------


async def test_unavailable_is_retried_with_backoff_on_another_endpoint():
    # A consistent hash with a fixed key would pick the same endpoint again.
    mesh = Mesh(
        services(
            lb="consistent_hash",
            hash_key="x-key",
            retry={"backoff_base": 0.1, "backoff_max": 0.15},
        )
    )
    call, first = mesh.start(metadata=[("x-key", "k")])
    pause = call.failed(UNAVAILABLE, True, 0.001)
    assert pause is not None and 0.0 <= pause <= 0.1
    assert call.cluster.retries == 1
    second = picked(call.pick())
    assert second.instance != first.instance
    pause = call.failed(UNAVAILABLE, True, 0.001)
    assert pause is not None and 0.0 <= pause <= 0.15
    third = picked(call.pick())
    assert third.instance not in {first.instance, second.instance}
    # Third attempt of max_attempts=3: no more retries.
    assert call.failed(UNAVAILABLE, True, 0.001) is None
    assert call.cluster.retries == 2
    assert all_in_flight(mesh) == [0] * 5
    for target in (first, second, third):
        assert mesh.endpoint(target.address).failures == 1


async def test_backoff_pauses_stay_within_the_cap():
    mesh = Mesh(services(retry={"max_attempts": 10, "backoff_base": 0.05, "backoff_max": 0.08}))
    pauses = []
    for _ in range(10):  # 90 retries: within the budget's reserve
        call, _ = mesh.start()
        for _ in range(9):
            pause = call.failed(UNAVAILABLE, True, 0.001)
            assert pause is not None
            pauses.append(pause)
            picked(call.pick())
        call.finish(UNAVAILABLE, None, 0.01)
    assert all(0.0 <= p <= 0.08 for p in pauses)
    assert max(pauses) > 0.05  # later retries back off beyond the base


async def test_not_retried_when_the_request_cannot_be_replayed():
    mesh = Mesh()
    call, _ = mesh.start()
    assert call.failed(UNAVAILABLE, False, 0.001) is None
    assert call.cluster.retries == 0 and call.cluster.budget.granted == 0


async def test_max_attempts_bounds_the_tries():
    mesh = Mesh(services(retry={"max_attempts": 2}))
    call, _ = mesh.start()
    assert call.failed(UNAVAILABLE, True, 0.001) is not None
    picked(call.pick())
    assert call.failed(UNAVAILABLE, True, 0.001) is None
    assert call.cluster.retries == 1
    one = Mesh(services(retry={"max_attempts": 1}))
    call, _ = one.start()
    assert call.failed(UNAVAILABLE, True, 0.001) is None


@pytest.mark.parametrize(
    ("idempotent", "retry_on", "retried"),
    [
        ((), (), False),
        (("M",), (), False),
        ((), ("INTERNAL",), False),
        (("Other",), ("INTERNAL",), False),
        (("M",), ("RESOURCE_EXHAUSTED",), False),
        (("M",), ("INTERNAL",), True),
        (("*",), ("INTERNAL",), True),
    ],
)
async def test_other_codes_are_retried_only_for_idempotent_methods_in_retry_on(
    idempotent, retry_on, retried
):
    mesh = Mesh(services(retry={"idempotent_methods": idempotent, "retry_on": retry_on}))
    call, _ = mesh.start("/a.S/M")
    pause = call.failed(INTERNAL, True, 0.001)
    assert (pause is not None) is retried
    assert call.cluster.retries == int(retried)
    assert all_in_flight(mesh) == [0] * 5


async def test_per_try_timeout_is_retried_only_for_idempotent_methods():
    mesh = Mesh(services(per_try_timeout=1.0, retry={"idempotent_methods": ["Get"]}))
    for method, retried in (("Get", True), ("Put", False)):
        begun = mesh.begin(f"/a.S/{method}", remaining=10.0)
        call, address = begun.call, picked(begun.first).address
        # The data plane bounds the try by this and by the deadline.
        assert begun.per_try_timeout == 1.0
        mesh.clock.now += 1.0
        pause = call.failed(DEADLINE_EXCEEDED, True, 1.0)
        assert (pause is not None) is retried, method
        # A try that timed out counts against its endpoint either way.
        assert mesh.endpoint(address).failures == 1
        call.finish(DEADLINE_EXCEEDED, None, 0.01)
    # Without a caller deadline, DEADLINE_EXCEEDED can only be the per-try timeout.
    call, _ = mesh.start("/a.S/Get")
    assert call.failed(DEADLINE_EXCEEDED, True, 1.0) is not None


async def test_the_callers_deadline_is_not_retried_nor_held_against_the_endpoint():
    mesh = Mesh(services(retry={"idempotent_methods": ["*"], "retry_on": ["DEADLINE_EXCEEDED"]}))
    call, target = mesh.start("/a.S/Get", remaining=1.0)
    address = target.address
    mesh.clock.now += 1.0
    assert call.failed(DEADLINE_EXCEEDED, True, 1.0) is None
    assert mesh.endpoint(address).failures == 0 and mesh.endpoint(address).in_flight == 0


async def test_the_retry_budget_denies_retries_once_spent():
    # No percentage, a reserve of 0.1/s over the 10 s window: exactly one retry.
    mesh = Mesh(services(retry={"budget_percent": 0.0, "budget_min_per_second": 0.1}))
    first, _ = mesh.start()
    assert first.failed(UNAVAILABLE, True, 0.001) is not None
    second, _ = mesh.start()
    assert second.failed(UNAVAILABLE, True, 0.001) is None
    budget = mesh.router.cluster("a.S").budget
    assert (budget.granted, budget.denied) == (1, 1)
    assert mesh.router.cluster("a.S").retries == 1
    assert all_in_flight(mesh) == [0] * 5
    # Once the window has moved on, the reserve is back.
    mesh.clock.now += 11.0
    third, _ = mesh.start()
    assert third.failed(UNAVAILABLE, True, 0.001) is not None


async def test_no_retry_when_the_deadline_is_shorter_than_the_pause():
    config = services(retry={"backoff_base": 0.2, "backoff_max": 0.2})
    # The same seed as the control's: the pause its first retry will draw.
    pause = Backoff(initial=0.2, maximum=0.2).delay(0, random.Random(Mesh(config).seed))
    short = Mesh(config)
    call, _ = short.start(remaining=pause + 0.004)
    assert call.failed(UNAVAILABLE, True, 0.0) is None
    assert short.router.cluster("a.S").retries == 0
    assert short.router.cluster("a.S").budget.granted == 0
    enough = Mesh(config)
    call, _ = enough.start(remaining=pause + 0.02)
    assert call.failed(UNAVAILABLE, True, 0.0) == pause
    # A tiny deadline never leaves room for a retry, whatever the pause.
    tiny = Mesh()
    call, _ = tiny.start(remaining=0.004)
    assert call.failed(UNAVAILABLE, True, 0.0) is None


# --- connection state --------------------------------------------------------------------


async def _until(condition: Any, what: str) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for {what}")


async def test_connection_state_from_another_thread_applies_on_the_loop():
    mesh = Mesh()
    down = mesh.endpoint("10.0.0.2:1")
    version = mesh.table.version

    def report(state: str) -> None:
        thread = threading.Thread(target=mesh.control.connection_state, args=(down.address, state))
        thread.start()
        thread.join()

    report("TRANSIENT_FAILURE")
    # Queued for the loop, which is busy running this test: nothing applied yet.
    assert down.reachable and down.state == "IDLE" and mesh.table.version == version
    await _until(lambda: not down.reachable, "the failure to apply")
    assert down.state == "TRANSIENT_FAILURE"
    assert mesh.table.version != version
    # Routing sees it at once: no call goes to the failing endpoint.
    for _ in range(12):
        call, pick = mesh.start()
        assert pick.address != down.address
        call.finish(OK, 0.001, 0.001)

    version = mesh.table.version
    report("READY")
    await _until(lambda: down.reachable, "the recovery to apply")
    assert down.state == "READY" and mesh.table.version != version
    addresses = set()
    for _ in range(12):
        call, pick = mesh.start()
        addresses.add(pick.address)
        call.finish(OK, 0.001, 0.001)
    assert down.address in addresses


async def test_connection_state_without_a_reachability_change_keeps_routes():
    mesh = Mesh()
    endpoint = mesh.endpoint("10.0.0.1:1")
    version = mesh.table.version
    thread = threading.Thread(
        target=mesh.control.connection_state, args=(endpoint.address, "CONNECTING")
    )
    thread.start()
    thread.join()
    await _until(lambda: endpoint.state == "CONNECTING", "the state to apply")
    assert endpoint.reachable and mesh.table.version == version
    # An address nobody has changes nothing.
    mesh.control.connection_state("10.9.9.9:1", "TRANSIENT_FAILURE")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert mesh.table.version == version
    assert all(e.reachable for e in mesh.table.endpoints())
