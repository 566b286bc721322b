"""grpcio credentials from a workload's identity, for mesh servers and clients.

Servers take their certificate from a callable asked at each new handshake
(``dynamic_ssl_server_credentials``), so a renewed leaf serves new connections while the
open ones keep theirs. Clients check the server's identity by its DNS form (see
``SpiffeId.dns_name``), since grpcio matches server names against DNS SANs only.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from identity.spiffe import SpiffeId
from identity.workload import Credentials

__all__ = ["bootstrap_credentials", "channel_credentials", "server_credentials", "target_options"]


def _configuration(current: Credentials) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(current.key_pem, current.chain_pem)], root_certificates=current.bundle_pem
    )


def server_credentials(
    current: Callable[[], Credentials], *, require_client_cert: bool = True
) -> grpc.ServerCredentials:
    """TLS from whatever ``current()`` holds at each handshake; client certificates
    verified against its bundle when ``require_client_cert``."""
    served = [current()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        latest = current()
        if latest is served[0]:
            return None  # grpcio keeps the configuration it has
        served[0] = latest
        return _configuration(latest)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(served[0]),
        fetch,  # type: ignore[arg-type]  # None means "no change" to grpcio; its stubs omit it
        require_client_authentication=require_client_cert,
    )


def channel_credentials(current: Credentials) -> grpc.ChannelCredentials:
    """mTLS: present ``current``'s leaf, trust its bundle."""
    return grpc.ssl_channel_credentials(
        root_certificates=current.bundle_pem,
        private_key=current.key_pem,
        certificate_chain=current.chain_pem,
    )


def bootstrap_credentials(bundle_pem: bytes) -> grpc.ChannelCredentials:
    """TLS with no certificate of our own: a workload's first call, for one."""
    return grpc.ssl_channel_credentials(root_certificates=bundle_pem)


def target_options(server: SpiffeId) -> list[tuple[str, str]]:
    """Channel options that make grpcio accept only ``server``'s certificate."""
    return [("grpc.ssl_target_name_override", server.dns_name)]
