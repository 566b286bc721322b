"""The registry server's lifecycle: gRPC server, sweeper task, metrics endpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from identity.authz import Policy
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service.access import Access
from registry_service.backend import Backend, MemoryBackend, RegistryView
from registry_service.calls import CallCollector, CallCounter, CallStats
from registry_service.config import RegistryConfig
from registry_service.policy_store import PolicyStore
from registry_service.servicer import RegistryServicer
from registry_service.xds import ads
from registry_service.xds.policy import XdsPolicies
from shoal_core.grpc_server import GrpcServer

__all__ = ["RegistryServer"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Registry"].full_name


class _StoreCollector(Collector):
    """Reads the store's counters at scrape time instead of updating metrics on the hot path."""

    def __init__(self, server: RegistryServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        store = self._server.store
        stats = store.stats
        for name, value, doc in (
            ("registrations", stats.registrations, "Register calls granted"),
            ("heartbeats", stats.heartbeats, "Heartbeats that renewed a lease"),
            ("heartbeats_not_found", stats.heartbeats_not_found, "Heartbeats for unknown leases"),
            ("deregistrations", stats.deregistrations, "Deregister calls"),
            ("lapses", stats.lapses, "Leases that lapsed (marked unhealthy)"),
            ("removals", stats.removals, "Lapsed instances removed after the grace"),
            (
                "self_preservation_entered",
                store.preservation.entered_total,
                "Times self-preservation was entered",
            ),
        ):
            yield CounterMetricFamily(f"shoal_registry_{name}", doc, value=value)
        everyone = store.instances()
        yield GaugeMetricFamily("shoal_registry_instances", "Registered instances", len(everyone))
        yield GaugeMetricFamily(
            "shoal_registry_instances_healthy",
            "Instances with a live lease that are SERVING",
            sum(1 for inst in everyone if inst.healthy),
        )
        yield GaugeMetricFamily(
            "shoal_registry_watchers", "Open watch streams", self._server.servicer.hub.watchers
        )
        policies = self._server.policies
        yield GaugeMetricFamily(
            "shoal_registry_policy_watchers", "Open policy watch streams", policies.watchers
        )
        yield GaugeMetricFamily(
            "shoal_registry_policy_rules",
            "Rules in the authorization policy",
            len(policies.policy.rules),
        )
        yield GaugeMetricFamily(
            "shoal_registry_xds_streams", "Open xDS (ADS) streams", self._server.xds.streams
        )
        yield GaugeMetricFamily(
            "shoal_registry_self_preservation",
            "1 while evictions are held",
            int(store.preservation.active),
        )


class RegistryServer(GrpcServer):
    """A registry on ``listen``; ``port`` tells the bound port when ``listen`` ends in :0."""

    def __init__(
        self,
        listen: str,
        config: RegistryConfig | None = None,
        *,
        metrics_listen: str | None = None,
        credentials: grpc.ServerCredentials | None = None,
        trust_domain: str | None = None,
        policy: Policy | None = None,
        state_dir: Path | None = None,
        backend: Backend | None = None,
        xds_policies: XdsPolicies | None = None,
    ) -> None:
        """``credentials`` (mTLS, see ``shoal_core.tls``) and ``trust_domain`` go together:
        with them every call is authorized by the caller's certificate (``access``).
        ``policy``: the mesh's authorization policy until an operator sets another
        (default: allow everything). ``state_dir``: where what must outlive a restart is
        kept (the policy an operator set, as ``policy.yaml``). ``backend``: where the
        instances live (default: in this process, ``MemoryBackend``); the server starts
        and closes it. ``xds_policies``: what xDS clients are told of balancing, retries,
        breakers and ejection (``xds.policy``; default: round robin only)."""
        if (credentials is None) != (trust_domain is None):
            raise ValueError("credentials and trust_domain go together")
        self.config = config or RegistryConfig()
        super().__init__(
            listen,
            max_message_bytes=self.config.max_message_bytes,
            metrics_listen=metrics_listen,
            credentials=credentials,
        )
        self.backend: Backend = backend or MemoryBackend(self.config)
        self.store: RegistryView = self.backend.view
        keep = None
        if state_dir is not None:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            keep = state_dir / "policy.yaml"
        self.policies = PolicyStore(policy, keep=keep)
        access = Access(trust_domain)
        self.servicer = RegistryServicer(
            self.backend,
            progress_interval=self.config.watch_progress_interval,
            queue_size=self.config.watch_queue_size,
            queue_bytes=self.config.watch_queue_bytes,
            access=access,
            policies=self.policies,
        )
        # xDS for proxyless gRPC clients, on the same port and under the same access rules.
        self.xds = ads.AdsServicer(
            self.store,
            access=access,
            max_streams=self.config.xds_max_streams,
            max_names=self.config.xds_max_names,
            policies=xds_policies,
        )
        # Every Registry call by method and status, counted by CallCounter as it ends.
        self.calls = CallStats()
        self.metrics.register(CallCollector(self.calls))
        self.metrics.register(_StoreCollector(self))

    def _interceptors(self) -> Sequence[grpc.aio.ServerInterceptor[Any, Any]]:
        return (CallCounter(self.calls),)

    def _add_servicers(self, server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_RegistryServicer_to_server(self.servicer, server)
        ads.add_to_server(self.xds, server)
        return [SERVICE_NAME, ads.SERVICE_NAME]

    async def start(self) -> None:
        # The state first: a registry that cannot reach its store does not serve.
        await self.backend.start()
        try:
            await super().start()
        except BaseException:
            await self.backend.close()
            raise

    async def _before_stop(self) -> None:
        watchers = self.servicer.hub.watchers
        if watchers:
            logger.info("ending %d watch stream(s)", watchers)
        self.servicer.hub.close_all()
        self.xds.close_all()
        self.policies.close_all()

    async def _after_stop(self) -> None:
        await self.xds.names.close()
        await self.backend.close()
