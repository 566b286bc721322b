"""The sidecar's per-service policy as what gRPC's xDS client can be told (pure: no
gRPC, no protobuf).

``shoal registry --xds-config FILE`` takes a file of the sidecar config's schema,
validated by the same models; ``translate`` turns each service's policy into an
``XdsPolicy`` that ``resources`` builds the Cluster and RouteConfiguration from. The
keys of ``services`` are the names clients put in ``xds:///NAME`` (the registry's
service names): a Cluster is per target, so that is where a cluster-wide setting can
live; ``defaults`` applies to every other target.

What gRPC implements is narrower than the sidecar (gRFCs A28, A32, A42, A44, A48,
A50, A52): what has no xDS form, or none that grpcio's C core honours, is listed by
``translate`` as one sentence per setting and logged once when the file is loaded,
never dropped in silence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from proxy_sidecar.balancers import available
from proxy_sidecar.config import RetrySettings, ServicePolicy, SidecarConfig, load_config
from registry_service.errors import InvalidArgument
from registry_service.validation import check_service_name
from shoal_core.config import ConfigError

__all__ = ["DEFAULT", "OutlierPlan", "RetryPlan", "XdsPolicies", "XdsPolicy", "load", "translate"]

logger = logging.getLogger(__name__)

# The only codes gRPC converts from an xDS retry_on (A44); it ignores any other value.
_RETRYABLE = {
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline-exceeded",
    "INTERNAL": "internal",
    "RESOURCE_EXHAUSTED": "resource-exhausted",
    "UNAVAILABLE": "unavailable",
}
# gRPC caps a retry policy's attempts at 5 (A6), whatever num_retries says.
_MAX_ATTEMPTS = 5
# Failure-percentage ejection standing in for consecutive failures (see _outlier).
FAILURE_THRESHOLD = 50
# Below this many instances failure-percentage ejection does not run: ejecting a lone
# instance leaves nothing to call, and gRPC has no panic threshold to undo it.
MINIMUM_HOSTS = 2


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """A route's ``retry_policy``: ``retry_on`` as gRPC's comma-separated names."""

    retry_on: str
    num_retries: int
    base_interval: float
    max_interval: float


@dataclass(frozen=True, slots=True)
class OutlierPlan:
    """A Cluster's ``outlier_detection`` with failure-percentage ejection only."""

    base_ejection: float
    max_ejection: float
    max_ejection_percent: int
    request_volume: int
    threshold: int = FAILURE_THRESHOLD
    minimum_hosts: int = MINIMUM_HOSTS


@dataclass(frozen=True, slots=True)
class XdsPolicy:
    """One target's policy as xDS can carry it. ``DEFAULT`` is what is served with no
    ``--xds-config``: round robin and nothing else."""

    lb: str = "round_robin"  # round_robin | ring_hash | least_request
    hash_header: str | None = None
    # Every method's retries, and those of ``idempotent_methods`` (method names, of
    # any gRPC service), which also retry the ``retry_on`` codes.
    retry: RetryPlan | None = None
    idempotent_retry: RetryPlan | None = None
    idempotent_methods: tuple[str, ...] = ()
    max_requests: int | None = None
    outlier: OutlierPlan | None = None


DEFAULT = XdsPolicy()


@dataclass(frozen=True, slots=True)
class XdsPolicies:
    """Every target's policy: those named in the file, and ``default`` for the rest."""

    services: dict[str, XdsPolicy]
    default: XdsPolicy = DEFAULT

    def of(self, service: str) -> XdsPolicy:
        return self.services.get(service, self.default)


def _plan(retry: RetrySettings, codes: list[str]) -> RetryPlan:
    return RetryPlan(
        retry_on=",".join(_RETRYABLE[code] for code in codes),
        num_retries=min(retry.max_attempts, _MAX_ATTEMPTS) - 1,
        base_interval=retry.backoff_base,
        max_interval=retry.backoff_max,
    )


_Retries = tuple[RetryPlan | None, RetryPlan | None, tuple[str, ...]]


def _retries(where: str, retry: RetrySettings, unmapped: list[str]) -> _Retries:
    """The sidecar always retries UNAVAILABLE, and its ``retry_on`` codes for idempotent
    methods only: a plan for every method, and one for those methods (a route of their
    own, before the catch-all)."""
    if retry.max_attempts > _MAX_ATTEMPTS:
        unmapped.append(
            f"{where}retry.max_attempts {retry.max_attempts}: gRPC makes at most "
            f"{_MAX_ATTEMPTS} attempts, so {_MAX_ATTEMPTS} are served"
        )
    dropped = [code for code in retry.retry_on if code not in _RETRYABLE]
    if dropped:
        unmapped.append(
            f"{where}retry.retry_on {', '.join(dropped)}: gRPC's xDS retries only "
            f"{', '.join(sorted(_RETRYABLE))}"
        )
    if retry.max_attempts == 1:
        return None, None, ()
    codes = ["UNAVAILABLE"] + [c for c in retry.retry_on if c in _RETRYABLE and c != "UNAVAILABLE"]
    every = _plan(retry, ["UNAVAILABLE"])
    if len(codes) == 1 or not retry.idempotent_methods:
        return every, None, ()
    if "*" in retry.idempotent_methods:
        return _plan(retry, codes), None, ()
    return every, _plan(retry, codes), tuple(sorted(set(retry.idempotent_methods)))


def _service(
    where: str, policy: ServicePolicy, config: SidecarConfig, unmapped: list[str]
) -> XdsPolicy:
    lb = policy.lb or config.lb
    served, hash_header = "round_robin", None
    if lb == "consistent_hash":
        served, hash_header = "ring_hash", policy.hash_key
    elif lb == "least_request":
        served = "least_request"
        unmapped.append(
            f"{where}lb least_request: served as least_request falling back to round_robin; "
            "grpcio's C core has no least_request (A48 is in Java and Go), so Python "
            "clients balance round robin"
        )
    elif lb != "round_robin":
        unmapped.append(f"{where}lb {lb}: gRPC has no such policy; served as round_robin")
    if policy.per_try_timeout is not None:
        unmapped.append(
            f"{where}per_try_timeout: gRPC ignores an xDS retry per_try_timeout (A44), and "
            "max_stream_duration would bound the whole call, not one try"
        )
    if policy.retry.idempotent_methods and not policy.retry.retry_on:
        unmapped.append(
            f"{where}retry.idempotent_methods: without retry_on codes they change nothing"
        )
    every, idempotent, methods = _retries(where, policy.retry, unmapped)
    return XdsPolicy(
        lb=served,
        hash_header=hash_header,
        retry=every,
        idempotent_retry=idempotent,
        idempotent_methods=methods,
        max_requests=policy.circuit_breaker.max_in_flight,
    )


# What every file sets, if only by default, and no target can be served.
_ALWAYS = [
    "retry.budget_percent/budget_min_per_second: xDS retry budgets are a circuit "
    "breaker gRPC does not implement (A44); retries are unbudgeted",
    "circuit_breaker.max_pending: gRPC queues no calls for a breaker (A32 has "
    "max_requests only); a call past max_in_flight fails UNAVAILABLE at once",
    "outlier.panic_threshold: gRPC has none; max_ejected_percent alone bounds ejection",
]


def _outlier(config: SidecarConfig, unmapped: list[str]) -> OutlierPlan:
    """gRPC has no consecutive-failure ejection (A50): an instance is ejected instead when,
    within one 10 s interval, it took at least ``consecutive_failures`` calls and more
    than half of them failed."""
    o = config.outlier
    unmapped.append(
        f"outlier.consecutive_failures {o.consecutive_failures}: gRPC ejects on failure "
        f"percentage only: served as over {FAILURE_THRESHOLD}% of at least "
        f"{o.consecutive_failures} calls failed in a 10 s interval, with at least "
        f"{MINIMUM_HOSTS} instances"
    )
    return OutlierPlan(
        base_ejection=o.base_ejection,
        max_ejection=max(o.max_ejection, o.base_ejection),
        max_ejection_percent=round(o.max_ejected_percent),
        request_volume=o.consecutive_failures,
    )


def translate(config: SidecarConfig) -> tuple[XdsPolicies, list[str]]:
    """Every target's policy, and one sentence per setting xDS cannot carry as given."""
    unmapped = list(_ALWAYS)
    outlier = _outlier(config, unmapped)
    default = _service("defaults: ", config.defaults, config, unmapped)
    services = {
        name: _service(f"services.{name}: ", policy, config, unmapped)
        for name, policy in sorted(config.services.items())
    }
    # The outlier settings are the sidecar's for every upstream: so for every Cluster.
    with_outlier = {name: replace(p, outlier=outlier) for name, p in services.items()}
    return XdsPolicies(with_outlier, replace(default, outlier=outlier)), unmapped


def load(path: str | Path) -> XdsPolicies:
    """The file's policies; ``ConfigError`` for a file that does not validate, or names
    a balancer the sidecar does not have. Logs each unmappable setting once."""
    config = load_config(path)
    for name in config.services:
        # A key no target can be named would be a policy that never applies.
        try:
            check_service_name("service", name)
        except InvalidArgument as exc:
            raise ConfigError(str(path), [f"services.{name}: {exc}"]) from None
    known = set(available())
    for where, policy in [("defaults", config.defaults), *config.services.items()]:
        lb = policy.lb or config.lb
        if lb not in known:
            raise ConfigError(str(path), [f"{where}: unknown load balancer {lb!r}"])
    policies, unmapped = translate(config)
    for sentence in unmapped:
        logger.warning("xds config %s: gRPC cannot do as the sidecar does: %s", path, sentence)
    return policies
