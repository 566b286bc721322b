"""Pure logic with fakes: endpoint table and its guard, balancers, outlier, budget, breaker."""

from __future__ import annotations

import collections
import sys
import threading

import pydantic
import pytest

from proxy_sidecar.balancers import Balancer, available, balancer_class, make_balancer
from proxy_sidecar.cluster import Cluster
from proxy_sidecar.config import OutlierSettings, ServicePolicy, SidecarConfig
from proxy_sidecar.endpoints import Endpoint, EndpointTable, InstanceInfo
from proxy_sidecar.errors import NoHealthyEndpoint, PolicyError, UnknownService
from proxy_sidecar.outlier import OutlierDetector
from proxy_sidecar.resilience import RetryBudget
from proxy_sidecar.routing import parse_method


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(n: int, service: str = "a.S", **kw) -> InstanceInfo:
    return InstanceInfo(
        instance_id=f"i{n}", address=f"10.0.0.{n}:1", grpc_services=(service,), **kw
    )


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(info(i)) for i in range(n)]


def test_empty_set_guard_holds_then_releases():
    clock = Clock()
    table = EndpointTable(empty_hold=5.0, clock=clock)
    changes = []
    table.subscribe(lambda added, removed: changes.append((len(added), len(removed))))
    table.replace([info(1), info(2)])
    table.remove("i1")
    table.remove("i2")
    # The last removal would empty a.S: held.
    assert [e.instance_id for e in table.members("a.S") or []] == ["i2"]
    clock.now += 4.9
    table.tick()
    assert len(table.members("a.S") or []) == 1
    clock.now += 0.2
    table.tick()
    assert not table.members("a.S")
    assert changes[-1] == (0, 1)


def test_empty_set_guard_ends_when_an_instance_returns():
    clock = Clock()
    table = EndpointTable(empty_hold=5.0, clock=clock)
    table.replace([info(1)])
    table.replace([])  # e.g. a restarted registry's first snapshot
    assert len(table.members("a.S") or []) == 1
    table.upsert(info(3))
    assert [e.instance_id for e in table.members("a.S") or []] == ["i3"]
    assert table.held() == {}


def test_unroutable_instance_leaves_and_load_updates_in_place():
    table = EndpointTable(empty_hold=0.0)
    table.replace([info(1), info(2)])
    first = table.members("a.S")
    assert first is not None
    version = table.version
    table.upsert(info(1, load_in_flight=7))
    assert table.version == version and table.members("a.S") is first
    assert first[0].info.load_in_flight == 7
    table.upsert(info(1, routable=False))
    assert [e.instance_id for e in table.members("a.S") or []] == ["i2"]
    assert table.members("b.T") is None


def test_every_built_in_policy_is_available_and_unknown_names_are_refused():
    assert set(available()) >= {
        "round_robin",
        "random",
        "least_request",
        "weighted",
        "consistent_hash",
        "peak_ewma",
        "least_loaded",
    }
    with pytest.raises(PolicyError, match="unknown load balancer 'nope'"):
        make_balancer("nope")


PLUGIN = """
from proxy_sidecar.balancers import Balancer

class First(Balancer):
    name = "first"

    def pick(self, endpoints, key, exclude):
        return next((e for e in endpoints if e not in exclude), None)
"""


def test_a_policy_installed_as_an_entry_point_is_found_by_name(tmp_path, monkeypatch):
    # A real distribution on sys.path, as pip would install it.
    (tmp_path / "shoal_first.py").write_text(PLUGIN)
    dist = tmp_path / "shoal_first-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shoal-first\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[shoal.balancers]\nfirst = shoal_first:First\nbroken = shoal_first:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    balancer_class.cache_clear()
    try:
        assert {"first", "broken", "round_robin"} <= set(available())
        balancer = make_balancer("first")
        assert type(balancer).__module__ == "shoal_first"
        eps = endpoints(2)
        assert balancer.pick(eps, None, (eps[0],)) is eps[1]
        with pytest.raises(PolicyError, match="'broken' cannot be loaded"):
            make_balancer("broken")
    finally:
        balancer_class.cache_clear()


@pytest.mark.parametrize(
    "name",
    [
        "round_robin",
        "random",
        "least_request",
        "weighted",
        "consistent_hash",
        "peak_ewma",
        "least_loaded",
    ],
)
def test_every_policy_honours_exclusion(name):
    balancer: Balancer = make_balancer(name)
    eps = endpoints(3)
    for _ in range(50):
        picked = balancer.pick(eps, "k", (eps[0], eps[1]))
        assert picked is eps[2]
    assert balancer.pick(eps, "k", eps) is None


def test_round_robin_is_even():
    balancer = make_balancer("round_robin")
    eps = endpoints(3)
    counts = collections.Counter(balancer.pick(eps, None, ()) for _ in range(300))
    assert set(counts.values()) == {100}


def test_least_request_prefers_idle():
    balancer = make_balancer("least_request")
    eps = endpoints(2)
    eps[0].in_flight = 10
    assert all(balancer.pick(eps, None, ()) is eps[1] for _ in range(20))


def test_weighted_follows_weights():
    balancer = make_balancer("weighted")
    eps = [Endpoint(info(0, weight=100)), Endpoint(info(1, weight=300))]
    counts = collections.Counter(balancer.pick(eps, None, ()) for _ in range(4000))
    assert 2.4 < counts[eps[1]] / counts[eps[0]] < 3.8


def test_consistent_hash_moves_only_the_leaving_endpoints_keys():
    balancer = make_balancer("consistent_hash")
    eps = endpoints(4)
    keys = [f"k{i}" for i in range(400)]
    before = {k: balancer.pick(eps, k, ()) for k in keys}
    smaller = [e for e in eps if e is not eps[2]]
    after = {k: balancer.pick(smaller, k, ()) for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert moved and all(before[k] is eps[2] for k in moved)


def test_peak_ewma_prefers_fast_and_forgets_slowly():
    balancer = make_balancer("peak_ewma")
    eps = endpoints(2)
    eps[0].observe_latency(0.5, 100.0, 10.0)
    eps[1].observe_latency(0.01, 100.0, 10.0)
    # Estimates are aged from their time; measure "now" for both alike.
    eps[0].ewma_at = eps[1].ewma_at = __import__("time").monotonic()
    assert all(balancer.pick(eps, None, ()) is eps[1] for _ in range(20))
    eps[1].observe_latency(0.9, eps[1].ewma_at + 0.001, 10.0)
    assert eps[1].ewma == 0.9  # a peak is taken at once


def test_least_loaded_uses_reported_load():
    balancer = make_balancer("least_loaded")
    eps = [Endpoint(info(0, load_in_flight=50)), Endpoint(info(1, load_in_flight=1))]
    assert all(balancer.pick(eps, None, ()) is eps[1] for _ in range(20))


def test_outlier_ejects_after_streak_caps_at_half_and_grows():
    detector = OutlierDetector(consecutive_failures=5, base_ejection=30.0, max_ejected_percent=50)
    a, b, c = endpoints(3)
    for _ in range(4):
        assert not detector.failure(a, 0.0, 3)
    detector.success(a)  # a success breaks the streak
    for _ in range(4):
        detector.failure(a, 0.0, 3)
    assert detector.failure(a, 0.0, 3) and detector.ejected_until(a) == 30.0
    for _ in range(5):
        assert not detector.failure(b, 0.0, 3)  # 2 of 3 would be more than half
    assert detector.release_due(29.9) == []
    assert detector.release_due(30.0) == [a]
    for _ in range(5):
        detector.failure(a, 31.0, 3)
    assert detector.ejected_until(a) == 31.0 + 60.0  # second ejection lasts twice as long
    assert not detector.is_ejected(c)


def test_cluster_panics_when_too_few_are_healthy():
    table = EndpointTable(empty_hold=0.0)
    table.replace([info(1), info(2), info(3)])
    cluster = Cluster(
        "a.S",
        table,
        ServicePolicy(),
        make_balancer("round_robin"),
        OutlierSettings(panic_threshold=50.0),
    )
    members = table.members("a.S") or ()
    members[0].reachable = members[1].reachable = False
    table.touch()
    picked = {cluster.pick(None).instance_id for _ in range(9)}
    assert cluster.panic and picked == {"i1", "i2", "i3"}
    members[1].reachable = True
    table.touch()
    picked = {cluster.pick(None).instance_id for _ in range(9)}
    assert not cluster.panic and picked == {"i2", "i3"}


def test_cluster_errors_name_the_problem():
    table = EndpointTable(empty_hold=0.0)
    cluster = Cluster("a.S", table, ServicePolicy(), make_balancer("random"), OutlierSettings())
    with pytest.raises(NoHealthyEndpoint, match="registry has not been reached"):
        cluster.pick(None)
    table.replace([])
    with pytest.raises(UnknownService):
        cluster.pick(None)


def test_retry_budget_is_percent_plus_reserve():
    clock = Clock()
    budget = RetryBudget(percent=20.0, min_per_second=1.0, window=10, clock=clock)
    for _ in range(100):
        budget.record_request()
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 20 + 10
    clock.now += 11  # the window has moved on: only the reserve is left
    assert sum(budget.try_retry() for _ in range(50)) == 10


def test_method_paths():
    route = parse_method("/pkg.v1.Svc/Do")
    assert route is not None and (route.service, route.method) == ("pkg.v1.Svc", "Do")
    for bad in ("", "/", "/x", "//M", "/a b/M", "/pkg.Svc/", "x/pkg.S/M", "/a/b/c"):
        assert parse_method(bad) is None


def test_routing_on_another_thread_never_sees_a_half_applied_update():
    # The data plane's thread picks while the event loop changes the table. A service
    # no routable endpoint serves makes the lookup consult every registered instance,
    # which is where a table read during a change broke ("dictionary changed size").
    def down(n: int) -> InstanceInfo:
        return InstanceInfo(
            instance_id=f"d{n}",
            address=f"10.1.{n // 200}.{n % 200}:1",
            grpc_services=("x.Down",),
            routable=False,
        )

    table = EndpointTable(empty_hold=0.0)
    table.replace([down(n) for n in range(1000)])
    cluster = Cluster(
        "x.Gone", table, ServicePolicy(), make_balancer("round_robin"), OutlierSettings()
    )
    errors: list[BaseException] = []
    picks = 0
    stop = threading.Event()

    def route() -> None:
        nonlocal picks
        while not stop.is_set():
            try:
                cluster.pick(None)
            except (NoHealthyEndpoint, UnknownService):
                picks += 1
            except BaseException as exc:
                errors.append(exc)
                return

    router = threading.Thread(target=route)
    # Switch threads as often as the interpreter can, so a change meets a read in flight.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    router.start()
    try:
        for n in range(1000, 4000):
            table.upsert(down(n))
            table.remove(f"d{n}")
    finally:
        stop.set()
        router.join()
        sys.setswitchinterval(interval)
    assert errors == []
    assert picks > 0


@pytest.mark.parametrize(
    "section",
    [
        {"defaults": {"retry": {"backoff_base": 1.0, "backoff_max": 0.5}}},
        {"discovery": {"backoff_initial": 2.0, "backoff_max": 1.0}},
    ],
)
def test_a_backoff_whose_cap_is_below_its_start_is_a_config_error(section):
    with pytest.raises(pydantic.ValidationError, match="must not be below"):
        SidecarConfig.model_validate(section)
