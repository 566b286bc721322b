"""The identity server's lifecycle: a gRPC server for Certify, on TLS with its own leaf.

Why a server of its own rather than a method of the registry: it is the one process
that holds the CA's issuing key, and it must take calls from workloads that have no
certificate yet, so its port cannot ask for client certificates while every other mesh
port must. The registry, which any mesh member talks to all the time, then never holds
the key that mints identities.

Its own leaf (``spiffe://<td>/identity``) it issues itself, and replaces at 70 % of its
life; new handshakes get the new one.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from identity.ca import CA, LEAF_TTL
from identity.certify import Certifier
from identity.spiffe import SpiffeId
from identity.workload import Credentials, new_request, renew_after
from identity_service.servicer import IdentityServicer
from protos import identity_pb2 as pb
from protos import identity_pb2_grpc as pb_grpc
from shoal_core.grpc_server import GrpcServer
from shoal_core.tls import server_credentials

__all__ = ["IdentityServer"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Identity"].full_name
# A CSR, a token or a leaf: a few kilobytes. Nothing bigger is taken from strangers.
MAX_MESSAGE_BYTES = 64 << 10


class IdentityServer(GrpcServer):
    """Certifies workloads with ``ca``'s issuer; leaves live ``leaf_ttl``."""

    def __init__(
        self,
        listen: str,
        ca: CA,
        *,
        leaf_ttl: dt.timedelta = LEAF_TTL,
        metrics_listen: str | None = None,
        ca_dir: Path | None = None,
    ) -> None:
        """With ``ca_dir`` (where ``ca`` was loaded from), each step of a root rotation
        made there is taken up as it happens."""
        self.certifier = Certifier(ca, leaf_ttl, directory=ca_dir)
        self.servicer = IdentityServicer(self.certifier)
        self._own = self._issue_own()
        super().__init__(
            listen,
            max_message_bytes=MAX_MESSAGE_BYTES,
            metrics_listen=metrics_listen,
            credentials=server_credentials(self.credentials, require_client_cert=False),
        )
        self.metrics.register(_IdentityCollector(self))

    def _issue_own(self) -> tuple[Credentials, float, CA]:
        ca = self.certifier.ca
        key, _ = new_request()
        who = SpiffeId(ca.trust_domain, "identity")
        leaf = ca.issue(key.public_key(), who, self.certifier.ttl)
        own = Credentials(key, leaf.cert_pem + leaf.chain_pem, ca.bundle_pem)
        return own, time.monotonic() + renew_after(leaf.cert), ca

    def credentials(self) -> Credentials:
        """The server's own leaf, renewed when it is due (asked at each handshake)."""
        ca = self.certifier.refresh()
        if time.monotonic() >= self._own[1] or ca is not self._own[2]:
            self._own = self._issue_own()
            logger.info("renewed the identity server's own certificate")
        return self._own[0]

    def _add_servicers(self, server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_IdentityServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]


class _IdentityCollector(Collector):
    """What the identity server did, read at scrape time."""

    def __init__(self, server: IdentityServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        servicer, certifier = self._server.servicer, self._server.certifier
        issued = CounterMetricFamily(
            "shoal_identity_certificates_issued",
            "Leaves issued, by the identity's kind (svc, registry, operator) and the proof "
            "(token: a first certificate; renewal)",
            labels=["kind", "proof"],
        )
        for (kind, proof), count in sorted(servicer.issued.items()):
            issued.add_metric([kind, proof], count)
        refused = CounterMetricFamily(
            "shoal_identity_certify_refused",
            "Certify calls refused, by proof and the status sent",
            labels=["proof", "code"],
        )
        for (proof, code), count in sorted(servicer.refused.items()):
            refused.add_metric([proof, code], count)
        yield from (issued, refused)
        yield GaugeMetricFamily(
            "shoal_identity_trust_bundle_roots",
            "Roots in the trust bundle served (2 during a rotation)",
            certifier.ca.trusted_roots,
        )
        yield GaugeMetricFamily(
            "shoal_identity_leaf_ttl_seconds",
            "Life of the leaves issued",
            certifier.ttl.total_seconds(),
        )
