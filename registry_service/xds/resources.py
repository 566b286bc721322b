"""The xDS v3 resources a gRPC client needs for ``xds:///SERVICE``, built from the
registry's live view (protobuf only, no gRPC).

gRPC's xDS resolver (gRFC A27) asks, in turn, for a Listener named after the target,
the RouteConfiguration its HTTP connection manager names, the Cluster the route
points at and that cluster's ClusterLoadAssignment. Every mesh service gets one of
each, all four named after the service. What gRPC checks, and NACKs if wrong:

- the Listener's ``api_listener`` holds an ``HttpConnectionManager`` whose route comes
  from RDS over ADS (or inline), and whose last HTTP filter is the router (A39);
- the route's virtual host matches the target's authority (the service name; ``*``
  here, so any authority does) and its action names a cluster;
- the Cluster is of type EDS with its ``eds_config`` on ADS, and a policy gRPC knows;
- each LocalityLbEndpoints has a locality weight: gRPC drops a locality without one.

gRPC routes only to endpoints that are HEALTHY or UNKNOWN: DRAINING and UNHEALTHY
ones stay listed (an operator can see them in a config dump) but get no new calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, message, wrappers_pb2

from registry_service.model import Instance, ServingStatus
from registry_service.xds import policy_resources
from registry_service.xds.policy import DEFAULT, XdsPolicy
from registry_service.xds.tls import upstream_tls
from shoal_core.addresses import parse_address

__all__ = [
    "CLUSTER",
    "ENDPOINTS",
    "LISTENER",
    "ROUTE",
    "TYPES",
    "cluster",
    "listener",
    "load_assignment",
    "route_config",
]

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINTS = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
# In the order gRPC asks for them.
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)

ROUTER_FILTER = "envoy.filters.http.router"

_Health = health_check_pb2.HealthStatus


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _ads() -> config_source_pb2.ConfigSource:
    # resource_api_version V3: gRPC refuses a v2 config source.
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def listener(service: str) -> listener_pb2.Listener:
    """The API listener for ``xds:///service``: its route comes from RDS over ADS, so a
    route change needs no new listener."""
    manager = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=service),
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_packed(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=service,
        api_listener=api_listener_pb2.ApiListener(api_listener=_packed(manager)),
    )


def route_config(service: str, policy: XdsPolicy = DEFAULT) -> route_pb2.RouteConfiguration:
    """Every call of ``service``'s channel goes to its one cluster, by routes that carry
    ``policy``'s retries and hashing (``policy_resources``)."""
    return route_pb2.RouteConfiguration(
        name=service,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=service,
                domains=["*"],
                routes=policy_resources.routes(service, policy),
            )
        ],
    )


def cluster(
    service: str, policy: XdsPolicy = DEFAULT, trust_domain: str | None = None
) -> cluster_pb2.Cluster:
    """An EDS cluster, balanced round robin unless ``policy`` says otherwise; its
    endpoints come over ADS too. In an mTLS mesh (``trust_domain``) its calls go on
    mTLS to the service's identity (``xds.tls``)."""
    out = cluster_pb2.Cluster(
        name=service,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if trust_domain is not None:
        out.transport_socket.CopyFrom(upstream_tls(trust_domain, service))
    policy_resources.tune_cluster(out, policy)
    return out


def _health(inst: Instance) -> health_check_pb2.HealthStatus.ValueType:
    # A lapsed lease outranks what the instance last said of itself.
    if not inst.lease_ok or inst.status is ServingStatus.NOT_SERVING:
        return _Health.UNHEALTHY
    if inst.status is ServingStatus.DRAINING:
        return _Health.DRAINING
    return _Health.HEALTHY


def _endpoint(inst: Instance, ip: str, port: int) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
            )
        ),
        health_status=_health(inst),
        # gRPC refuses a weight of 0; the registry's weights are >= 1 already.
        load_balancing_weight=wrappers_pb2.UInt32Value(value=max(1, inst.spec.weight)),
    )


def load_assignment(
    service: str,
    instances: Iterable[Instance],
    address_of: Callable[[str], str | None] | None = None,
) -> endpoint_pb2.ClusterLoadAssignment:
    """``service``'s instances, one locality per zone, sorted so that the same state
    always serializes to the same bytes (streams compare them to tell a change).
    ``address_of`` gives a registered host as an IP literal, which is all gRPC takes
    (``names``; None: hosts are IPs already); an instance whose host it cannot give
    yet is left out.

    gRPC first picks a locality by its weight, then an endpoint round robin within it:
    a zone weighs what its routable instances weigh together, so a zone of one
    instance gets no more calls per instance than a zone of ten.
    """
    by_zone: dict[str, list[tuple[Instance, str, int]]] = defaultdict(list)
    for inst in instances:
        where = parse_address(inst.spec.address)
        host = where.host.strip("[]")
        ip = host if address_of is None else address_of(host)
        if ip is not None:
            by_zone[inst.spec.zone].append((inst, ip, where.port))
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=service)
    for zone in sorted(by_zone):
        placed = sorted(by_zone[zone], key=lambda each: each[0].spec.instance_id)
        members = [inst for inst, _, _ in placed]
        out.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=zone),
                lb_endpoints=[_endpoint(inst, ip, port) for inst, ip, port in placed],
                # Never 0: gRPC drops a locality of weight 0 and we want its
                # endpoints listed, with their health, all the same.
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=max(1, sum(inst.spec.weight for inst in members if inst.healthy))
                ),
            )
        )
    return out
