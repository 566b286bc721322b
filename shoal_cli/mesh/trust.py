"""The trust of a ``shoal up`` mesh: an ephemeral CA in its run directory, and tokens.

``shoal up`` needs no setup for mTLS: it makes a CA for the one mesh (``ca/``, keys mode
0600, in a run directory only its user can read), then one join token per identity its
children take (``tokens/``, 0600 too). A child finds the identity server, the bundle and
its token file through ``SHOAL_*`` variables set for it alone, so no token is ever on a
command line. A restarted child certifies again with the same token, hence tokens that
last as long as a mesh may reasonably run (``TOKEN_TTL``), not an hour.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from identity.ca import CA, init_ca, load_ca
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId
from identity.tokens import create_token
from shoal_core.certifying import MeshIdentity

__all__ = ["MeshTrust", "make_trust"]

TOKEN_TTL = dt.timedelta(days=7)
# Who takes a token: the registry, the workers' sidecars, the client sidecar, operators.
ROLES = ("registry", "worker", "client", "operator")


@dataclass(frozen=True)
class MeshTrust:
    """Where a mesh's CA and tokens are; ``identity_address`` is set by the plan."""

    ca_dir: Path
    tokens_dir: Path
    identity_address: str = ""

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "bundle.crt"

    def token_file(self, role: str) -> Path:
        return self.tokens_dir / f"{role}.token"

    def operator(self) -> MeshIdentity:
        """How ``shoal up`` itself (and operator commands) certify as an operator."""
        token = self.token_file("operator").read_text()
        return MeshIdentity.load(self.identity_address, self.bundle, token)

    def env(self, role: str) -> dict[str, str]:
        """What a child of ``role`` needs to certify (see ``shoal_cli.mesh_tls``)."""
        return {
            "SHOAL_IDENTITY_SERVER": self.identity_address,
            "SHOAL_TRUST_BUNDLE": str(self.bundle),
            "SHOAL_TOKEN_FILE": str(self.token_file(role)),
        }


def _identity(ca: CA, role: str) -> SpiffeId | str:
    if role == "registry":
        return SpiffeId(ca.trust_domain, "registry")
    if role == "operator":
        try:  # named after the user, for the registry's logs, where the name allows it
            return SpiffeId(ca.trust_domain, "operator", os.environ.get("USER") or "admin")
        except SpiffeError:
            return SpiffeId(ca.trust_domain, "operator", "admin")
    return role  # a service name


def make_trust(run_dir: Path) -> MeshTrust:
    """A CA in ``run_dir/ca`` (kept if one is there: a reused run directory) and fresh
    tokens for every role."""
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)  # the CA's keys and the tokens are in it
    ca_dir = run_dir / "ca"
    if (ca_dir / "issuer.key").exists():
        ca = load_ca(ca_dir)
    else:
        ca = init_ca(ca_dir, DEFAULT_TRUST_DOMAIN)
    tokens = run_dir / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    for role in ROLES:
        token, _ = create_token(ca, _identity(ca, role), TOKEN_TTL)
        path = tokens / f"{role}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
    return MeshTrust(ca_dir, tokens)
