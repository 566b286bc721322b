"""SPIFFE IDs as the mesh names its workloads: ``spiffe://<trust-domain>/<kind>/<name>``.

``svc/<service>`` is an instance's sidecar, ``registry`` the registry, ``identity`` the
server that issues certificates, and ``operator/<name>`` a person or script using the
CLI. Parsing follows the SPIFFE ID standard: lowercase trust domain, path segments of
letters, digits, ``.``, ``-``, ``_``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_TRUST_DOMAIN", "SpiffeError", "SpiffeId"]

DEFAULT_TRUST_DOMAIN = "shoal.local"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")
_KINDS = {"svc": 1, "operator": 1, "registry": 0, "identity": 0}
_LABELS = {"svc": "service", "operator": "operator", "registry": "registry", "identity": "identity"}


class SpiffeError(ValueError):
    """Not a SPIFFE ID this mesh issues."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    kind: str
    name: str = ""

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise SpiffeError(
                f"trust domain {self.trust_domain!r} must be lowercase letters, digits, '.', "
                "'-' or '_'"
            )
        if self.kind not in _KINDS:
            raise SpiffeError(f"unknown kind {self.kind!r}: one of {', '.join(sorted(_KINDS))}")
        if _KINDS[self.kind] and not _SEGMENT.fullmatch(self.name):
            raise SpiffeError(
                f"{_LABELS[self.kind]} name {self.name!r} must be letters, digits, '.', '-' or '_'"
            )
        if not _KINDS[self.kind] and self.name:
            raise SpiffeError(f"{self.kind} takes no name")
        if self.name in (".", ".."):
            raise SpiffeError(f"{self.kind} name may not be {self.name!r}")

    @classmethod
    def service(cls, trust_domain: str, service: str) -> SpiffeId:
        return cls(trust_domain, "svc", service)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The ID in ``uri``; ``SpiffeError`` if it is not one this mesh issues."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise SpiffeError(f"{uri!r} is not a spiffe:// URI")
        trust_domain, _, path = uri[len(prefix) :].partition("/")
        parts = path.split("/")
        kind, name = parts[0], "/".join(parts[1:])
        if len(parts) > 2 or (len(parts) == 2 and not name):
            raise SpiffeError(
                f"{uri!r}: the path must be svc/NAME, operator/NAME, registry or identity"
            )
        return cls(trust_domain, kind, name)

    @property
    def dns_name(self) -> str:
        """The ID as a DNS name (``worker.svc.shoal.local``, ``registry.shoal.local``).

        Leaves carry it beside the URI SAN because grpcio checks a server's name only
        against DNS names: a client that expects the registry asks for this name.
        """
        head = f"{self.name}.{self.kind}" if self.name else self.kind
        return f"{head}.{self.trust_domain}"

    def __str__(self) -> str:
        tail = f"/{self.name}" if self.name else ""
        return f"spiffe://{self.trust_domain}/{self.kind}{tail}"
