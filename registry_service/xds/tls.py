"""mTLS for proxyless clients, as xDS says it (gRFC A29): each Cluster carries an
``UpstreamTlsContext`` whose certificates come from the client's own certificate
provider (protobuf only, no gRPC).

The context names no file and no key: it refers to a provider *instance* the client's
bootstrap defines (``shoal xds-bootstrap --cert-dir`` defines ``shoal``, gRPC's
``file_watcher`` plugin reading what ``shoal identity-agent`` writes). From it the
client takes its own leaf, which the upstream's sidecar checks and authorizes as it
does a sidecar's, and the roots it checks the upstream against. The upstream must
also prove it is the service the cluster is for: the context matches the SAN of its
certificate exactly against ``spiffe://<trust domain>/svc/<service>``, as a sidecar
dialing that instance would. A client that ignores the context (one using insecure
channel credentials) speaks plaintext to an mTLS sidecar and is refused, so a
misconfigured client fails closed.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2

from identity.spiffe import SpiffeId

__all__ = ["CERTIFICATE_PROVIDER", "TLS_TRANSPORT_SOCKET", "upstream_tls"]

# The certificate provider instance the bootstrap defines and every cluster refers to.
CERTIFICATE_PROVIDER = "shoal"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"


def upstream_tls(trust_domain: str, service: str) -> base_pb2.TransportSocket:
    """The transport socket of ``service``'s cluster in mesh ``trust_domain``."""
    provider = common_pb2.CertificateProviderPluginInstance(instance_name=CERTIFICATE_PROVIDER)
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_provider_instance=provider,
            validation_context=common_pb2.CertificateValidationContext(
                ca_certificate_provider_instance=provider,
                # gRPC reads this (older) field; it matches URI SANs among others.
                match_subject_alt_names=[
                    string_pb2.StringMatcher(exact=str(SpiffeId.service(trust_domain, service)))
                ],
            ),
        )
    )
    packed = any_pb2.Any()
    packed.Pack(context)
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=packed)
