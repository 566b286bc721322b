"""The mesh identity of a gRPC call's peer, from grpcio's auth context."""

from __future__ import annotations

import functools
from typing import Any

import grpc
from cryptography import x509

from identity.certify import spiffe_id_of
from identity.spiffe import SpiffeError, SpiffeId

__all__ = ["peer_identity"]


@functools.lru_cache(maxsize=1024)
def _parse(pem: bytes) -> SpiffeId | None:
    # A peer's certificate is parsed once per distinct certificate, not once per call:
    # a heartbeat a second from each instance would otherwise parse X.509 each time.
    try:
        return spiffe_id_of(x509.load_pem_x509_certificate(pem))
    except (ValueError, SpiffeError):
        return None


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> SpiffeId | None:
    """The SPIFFE ID of the verified client certificate, or None without one.

    grpcio puts a client certificate in the auth context only once it has verified it
    against the server's trust bundle, so what is here is proven.
    """
    cert = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
    return None if cert is None else _parse(cert)
