"""A workload's credentials as files, for programs that read certificates from disk.

A proxyless gRPC client takes its mTLS certificate through gRPC's ``file_watcher``
certificate provider (gRFC A29), which re-reads three PEM files every refresh
interval: the leaf with its chain, its key, and the roots to trust. ``shoal
identity-agent`` keeps them current; ``shoal xds-bootstrap --cert-dir`` names them.
The names are those of the SPIFFE helper's defaults, which such tools also read.

Each file is replaced whole (``write_atomic``), roots first so that a leaf from a new
root is never on disk before the root is. gRPC checks that the key and leaf it reads
belong together and keeps what it had until they do, so the instant between the
key's rename and the leaf's costs nothing. The key is 0600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from identity.workload import Credentials
from shoal_core.files import write_atomic

__all__ = ["CertFiles"]


@dataclass(frozen=True)
class CertFiles:
    directory: Path

    @property
    def chain(self) -> Path:
        return self.directory / "svid.pem"

    @property
    def key(self) -> Path:
        return self.directory / "svid_key.pem"

    @property
    def bundle(self) -> Path:
        return self.directory / "svid_bundle.pem"

    def write(self, held: Credentials) -> None:
        """Put ``held`` on disk; ``OSError`` if the directory cannot take it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.bundle, held.bundle_pem)
        write_atomic(self.key, held.key_pem, 0o600)
        write_atomic(self.chain, held.chain_pem)
