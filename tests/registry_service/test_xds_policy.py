"""``registry_service.xds.policy``: the sidecar's policy, field by field, as the xDS
fields gRPC honours, what it says it cannot map, and the resources built from it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2

from proxy_sidecar.config import SidecarConfig
from registry_service.xds import policy_resources, resources
from registry_service.xds.policy import (
    DEFAULT,
    OutlierPlan,
    RetryPlan,
    XdsPolicy,
    load,
    translate,
)
from shoal_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

FULL = {
    "lb": "peak_ewma",
    "services": {
        "echo": {
            "lb": "consistent_hash",
            "hash_key": "x-key",
            "per_try_timeout": 1.5,
            "retry": {
                "max_attempts": 4,
                "retry_on": ["RESOURCE_EXHAUSTED", "DATA_LOSS"],
                "idempotent_methods": ["Who", "Get"],
                "backoff_base": 0.01,
                "backoff_max": 0.2,
            },
            "circuit_breaker": {"max_in_flight": 7, "max_pending": 3},
        }
    },
    "outlier": {
        "consecutive_failures": 3,
        "base_ejection": 10,
        "max_ejection": 20,
        "max_ejected_percent": 33.4,
    },
}


def translated(data: dict[str, Any]) -> tuple[dict[str, XdsPolicy], XdsPolicy, list[str]]:
    served, unmapped = translate(SidecarConfig.model_validate(data))
    return served.services, served.default, unmapped


def test_each_mapped_field() -> None:
    services, default, _ = translated(FULL)
    echo = services["echo"]
    assert echo.lb == "ring_hash" and echo.hash_header == "x-key"
    # Every method retries UNAVAILABLE; the idempotent ones the codes gRPC knows too.
    assert echo.retry == RetryPlan("unavailable", 3, 0.01, 0.2)
    assert echo.idempotent_retry == RetryPlan("unavailable,resource-exhausted", 3, 0.01, 0.2)
    assert echo.idempotent_methods == ("Get", "Who")
    assert echo.max_requests == 7
    outlier = OutlierPlan(
        base_ejection=10, max_ejection=20, max_ejection_percent=33, request_volume=3
    )
    assert echo.outlier == outlier and default.outlier == outlier
    # Unnamed targets get the defaults: here an unmappable balancer, so round robin.
    assert default.lb == "round_robin" and default.max_requests == 1000
    assert default.retry == RetryPlan("unavailable", 2, 0.025, 0.25)


def test_what_cannot_be_mapped_is_said() -> None:
    _, _, unmapped = translated(FULL)
    said = "\n".join(unmapped)
    for expected in (
        "defaults: lb peak_ewma",
        "services.echo: per_try_timeout",
        "services.echo: retry.retry_on DATA_LOSS",
        "retry.budget_percent",
        "circuit_breaker.max_pending",
        "outlier.panic_threshold",
        "outlier.consecutive_failures 3",
    ):
        assert expected in said, said
    assert len(unmapped) == len(set(unmapped))


@pytest.mark.parametrize(
    "retry, every, idempotent",
    [
        ({"max_attempts": 1}, None, None),
        ({"max_attempts": 9}, RetryPlan("unavailable", 4, 0.025, 0.25), None),
        (
            {"retry_on": ["INTERNAL"], "idempotent_methods": ["*"]},
            RetryPlan("unavailable,internal", 2, 0.025, 0.25),
            None,
        ),
        ({"retry_on": ["INTERNAL"]}, RetryPlan("unavailable", 2, 0.025, 0.25), None),
    ],
)
def test_retry_shapes(retry: dict[str, Any], every: Any, idempotent: Any) -> None:
    services, _, unmapped = translated({"services": {"echo": {"retry": retry}}})
    assert services["echo"].retry == every
    assert services["echo"].idempotent_retry == idempotent
    if retry.get("max_attempts") == 9:
        assert any("at most 5 attempts" in s for s in unmapped)


def test_least_request_falls_back_to_round_robin_and_says_so() -> None:
    services, _, unmapped = translated({"services": {"echo": {"lb": "least_request"}}})
    assert services["echo"].lb == "least_request"
    assert any("least_request" in s and "round robin" in s for s in unmapped)
    cluster = resources.cluster("echo", services["echo"])
    (outer,) = cluster.load_balancing_policy.policies
    wrr = wrr_locality_pb2.WrrLocality()
    assert outer.typed_extension_config.typed_config.Unpack(wrr)
    inner = [
        p.typed_extension_config.typed_config.type_url for p in wrr.endpoint_picking_policy.policies
    ]
    assert [url.rsplit(".", 1)[-1] for url in inner] == ["LeastRequest", "RoundRobin"]


def test_resources_carry_the_policy() -> None:
    services, _, _ = translated(FULL)
    echo = services["echo"]
    (host,) = resources.route_config("echo", echo).virtual_hosts
    first, catch_all = host.routes
    assert first.match.safe_regex.regex == "/[^/]+/(Get|Who)"
    assert first.route.retry_policy.retry_on == "unavailable,resource-exhausted"
    assert catch_all.match.prefix == "" and catch_all.route.cluster == "echo"
    retry = catch_all.route.retry_policy
    assert retry.retry_on == "unavailable" and retry.num_retries.value == 3
    assert retry.retry_back_off.base_interval.ToMilliseconds() == 10
    assert retry.retry_back_off.max_interval.ToMilliseconds() == 200
    for route in host.routes:
        (hashing,) = route.route.hash_policy
        assert hashing.header.header_name == "x-key"

    cluster = resources.cluster("echo", echo)
    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    (threshold,) = cluster.circuit_breakers.thresholds
    assert threshold.max_requests.value == 7
    od = cluster.outlier_detection
    assert od.enforcing_success_rate.value == 0  # unset would mean 100: on
    assert od.enforcing_failure_percentage.value == 100
    assert od.failure_percentage_request_volume.value == 3
    assert od.failure_percentage_threshold.value == 50
    assert od.failure_percentage_minimum_hosts.value == 2
    assert od.base_ejection_time.seconds == 10 and od.max_ejection_time.seconds == 20
    assert od.max_ejection_percent.value == 33
    assert od.interval.seconds == policy_resources.OUTLIER_INTERVAL


def test_without_a_file_todays_resources_stay() -> None:
    assert resources.cluster("echo", DEFAULT) == resources.cluster("echo")
    cluster = resources.cluster("echo")
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert not cluster.HasField("circuit_breakers") and not cluster.HasField("outlier_detection")
    (route,) = resources.route_config("echo").virtual_hosts[0].routes
    assert not route.route.HasField("retry_policy") and not route.route.hash_policy


def test_load_logs_each_unmapped_setting_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "xds.yaml"
    path.write_text("services:\n  echo: {lb: peak_ewma, per_try_timeout: 2}\n")
    with caplog.at_level(logging.WARNING, logger="registry_service.xds.policy"):
        served = load(path)
    assert served.of("echo").lb == "round_robin"
    lines = [r.getMessage() for r in caplog.records]
    assert sum("lb peak_ewma" in line for line in lines) == 1
    assert sum("per_try_timeout" in line for line in lines) == 1
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_load_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "xds.yaml"
    path.write_text("services:\n  echo: {lb: no_such_balancer}\n")
    with pytest.raises(ConfigError, match="unknown load balancer 'no_such_balancer'"):
        load(path)
    path.write_text("services:\n  echo: {retry: {max_attempts: 0}}\n")
    with pytest.raises(ConfigError, match="max_attempts"):
        load(path)
    path.write_text("services:\n  /not a name/: {}\n")
    with pytest.raises(ConfigError, match="services./not a name/"):
        load(path)


def test_registry_with_a_bad_xds_config_exits_2_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "xds.yaml"
    path.write_text("services:\n  echo: {hash_key: Not-A-Key}\n")
    done = subprocess.run(
        [sys.executable, "-m", "shoal_cli.main", "registry", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "SHOAL_XDS_CONFIG": str(path)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "hash_key" in done.stderr
