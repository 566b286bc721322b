"""A target's ``XdsPolicy`` as the fields of its routes and Cluster (protobuf only, no
gRPC), in the forms gRPC's xDS client validates and honours:

- ring hash (A42): ``Cluster.lb_policy`` RING_HASH, and on every route a
  ``hash_policy`` hashing the header named by the sidecar's ``hash_key``; a call
  without that header gets a random hash;
- least request (A48, A52): ``load_balancing_policy`` listing LeastRequest, then
  RoundRobin, inside WrrLocality (which keeps the zones' weights): a client takes the
  first it implements, and grpcio's C core implements only the second;
- retries (A44): the route's ``retry_policy``: ``retry_on`` as status names,
  ``num_retries`` and ``retry_back_off``; gRPC doubles the back-off per attempt;
- circuit breaking (A32): ``circuit_breakers.thresholds[0].max_requests``;
- outlier detection (A50): failure-percentage ejection, success rate disabled
  explicitly (an unset ``enforcing_success_rate`` means 100, i.e. on).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.route.v3 import route_components_pb2 as route_pb
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from registry_service.xds.policy import RetryPlan, XdsPolicy

__all__ = ["OUTLIER_INTERVAL", "routes", "tune_cluster"]

# The sweep of failure-percentage ejection: gRPC's default, said explicitly.
OUTLIER_INTERVAL = 10.0


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _retry(plan: RetryPlan) -> route_pb.RetryPolicy:
    return route_pb.RetryPolicy(
        retry_on=plan.retry_on,
        num_retries=_u32(plan.num_retries),
        retry_back_off=route_pb.RetryPolicy.RetryBackOff(
            base_interval=_duration(plan.base_interval),
            max_interval=_duration(plan.max_interval),
        ),
    )


def _action(service: str, policy: XdsPolicy, retry: RetryPlan | None) -> route_pb.RouteAction:
    action = route_pb.RouteAction(cluster=service)
    if policy.hash_header is not None:
        header = route_pb.RouteAction.HashPolicy.Header(header_name=policy.hash_header)
        action.hash_policy.append(route_pb.RouteAction.HashPolicy(header=header))
    if retry is not None:
        action.retry_policy.CopyFrom(_retry(retry))
    return action


def routes(service: str, policy: XdsPolicy) -> list[route_pb.Route]:
    """The idempotent methods' route first (gRPC takes the first route that matches),
    then the one for every call."""
    out = []
    if policy.idempotent_retry is not None:
        # Method names of any gRPC service: the sidecar's idempotent_methods name no
        # service. gRPC matches a safe_regex against the whole path (RE2).
        names = "|".join(policy.idempotent_methods)
        out.append(
            route_pb.Route(
                match=route_pb.RouteMatch(
                    safe_regex=regex_pb2.RegexMatcher(regex=f"/[^/]+/({names})")
                ),
                route=_action(service, policy, policy.idempotent_retry),
            )
        )
    out.append(
        route_pb.Route(
            match=route_pb.RouteMatch(prefix=""), route=_action(service, policy, policy.retry)
        )
    )
    return out


def _extension(name: str, msg: message.Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(
            name=name, typed_config=_packed(msg)
        )
    )


def _least_request() -> cluster_pb2.LoadBalancingPolicy:
    picking = cluster_pb2.LoadBalancingPolicy(
        policies=[
            _extension(
                "envoy.load_balancing_policies.least_request", least_request_pb2.LeastRequest()
            ),
            _extension("envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin()),
        ]
    )
    wrr = wrr_locality_pb2.WrrLocality(endpoint_picking_policy=picking)
    return cluster_pb2.LoadBalancingPolicy(
        policies=[_extension("envoy.load_balancing_policies.wrr_locality", wrr)]
    )


def tune_cluster(out: cluster_pb2.Cluster, policy: XdsPolicy) -> None:
    """Set ``policy``'s balancer, breaker and outlier detection on ``out``."""
    if policy.lb == "ring_hash":
        out.lb_policy = cluster_pb2.Cluster.RING_HASH
    elif policy.lb == "least_request":
        # It takes precedence over lb_policy (A52), which stays ROUND_ROBIN for
        # clients from before load_balancing_policy.
        out.load_balancing_policy.CopyFrom(_least_request())
    if policy.max_requests is not None:
        out.circuit_breakers.CopyFrom(
            circuit_breaker_pb2.CircuitBreakers(
                thresholds=[
                    circuit_breaker_pb2.CircuitBreakers.Thresholds(
                        max_requests=_u32(policy.max_requests)
                    )
                ]
            )
        )
    plan = policy.outlier
    if plan is not None:
        out.outlier_detection.CopyFrom(
            outlier_detection_pb2.OutlierDetection(
                interval=_duration(OUTLIER_INTERVAL),
                base_ejection_time=_duration(plan.base_ejection),
                max_ejection_time=_duration(plan.max_ejection),
                max_ejection_percent=_u32(plan.max_ejection_percent),
                enforcing_success_rate=_u32(0),
                failure_percentage_threshold=_u32(plan.threshold),
                enforcing_failure_percentage=_u32(100),
                failure_percentage_minimum_hosts=_u32(plan.minimum_hosts),
                failure_percentage_request_volume=_u32(plan.request_volume),
            )
        )
