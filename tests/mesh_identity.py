"""Real certificates for tests: a CA, and credentials for any identity straight from it."""

from __future__ import annotations

import datetime as dt

from identity.ca import CA
from identity.spiffe import SpiffeId
from identity.workload import Credentials, new_request

TD = "shoal.local"


def credentials(
    ca: CA,
    who: SpiffeId | str,
    ttl: dt.timedelta = dt.timedelta(hours=1),
    hosts: tuple[str, ...] = (),
) -> Credentials:
    """Credentials for ``who`` (a SpiffeId, or a service name) issued by ``ca``, naming
    ``hosts`` too (the registry's only)."""
    if isinstance(who, str):
        who = SpiffeId.service(ca.trust_domain, who)
    key, _ = new_request()
    leaf = ca.issue(key.public_key(), who, ttl, hosts)
    return Credentials(key, leaf.cert_pem + leaf.chain_pem, ca.bundle_pem)
