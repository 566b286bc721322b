"""TLS to etcd: its CA, and the registry's client certificate when etcd asks for one.

One setting for both ways the registry talks to etcd: HTTPS to the gateway (an
``ssl.SSLContext``) and gRPC for lease renewals (grpcio credentials). Only paths are
held, so the key is read where it is used and never sits in a repr or a log line.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["EtcdTls"]


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """PEM files: the CA that signed etcd's certificates, and an optional client pair."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate for etcd needs both its cert and its key")

    def check(self) -> None:
        """``ValueError`` (one line) when a file cannot be read or is no PEM of its kind."""
        try:
            self.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"etcd TLS files: {exc}") from exc

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(self.ca.read_bytes())
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        )
