"""Who may do what at the registry, decided from the caller's mesh identity.

An instance's sidecar may register, renew and deregister only instances of the service
its certificate names: otherwise any process that reaches the registry could register
as ``worker`` and draw the client's calls, or take another service's instances out.
Reading (Discover, Watch, ListServices, GetPolicy, WatchPolicy) needs any identity of
this mesh. Operators may do everything, and only they may set the mesh's authorization
policy: a service that could would grant itself any call. A registry that runs without
TLS (``--insecure``) has no identities to go by and lets everyone do everything, as a
plaintext mesh always did.
"""

from __future__ import annotations

from identity.spiffe import SpiffeId
from registry_service.errors import RegistryError

__all__ = ["Access", "PermissionDenied", "Unauthenticated"]


class Unauthenticated(RegistryError):
    """The caller has no mesh identity."""


class PermissionDenied(RegistryError):
    """The caller's identity may not do this; the message names both sides."""


class Access:
    """The rules for a registry of ``trust_domain``; ``None``: no TLS, no rules."""

    def __init__(self, trust_domain: str | None) -> None:
        self.trust_domain = trust_domain

    def _known(self, who: SpiffeId | None) -> SpiffeId | None:
        if self.trust_domain is None:
            return None
        if who is None:
            raise Unauthenticated("a mesh certificate is required")
        if who.trust_domain != self.trust_domain:
            raise Unauthenticated(f"{who} is not of trust domain {self.trust_domain}")
        return who

    def read(self, who: SpiffeId | None) -> None:
        self._known(who)

    def operate(self, who: SpiffeId | None, action: str) -> None:
        """``who`` is an operator, who alone may ``action``, or this raises."""
        known = self._known(who)
        if known is not None and known.kind != "operator":
            raise PermissionDenied(f"{known} may not {action}: only operators may")

    def claim(
        self, who: SpiffeId | None, service: str, grpc_service: str, owners: set[str]
    ) -> None:
        """``who`` may list an instance of ``service`` as serving ``grpc_service``, which
        instances of ``owners`` serve already, or this raises.

        Sidecars route a call by its gRPC service: a caller with a valid certificate for
        any service could otherwise draw another service's calls by claiming its gRPC
        service, and prove its own identity to the caller's sidecar. One service serves
        a gRPC service while it has instances; operators may overrule that.
        """
        self._sole(
            who, service, owners, f"list {grpc_service} for service {service!r}", "serves it"
        )

    def place(self, who: SpiffeId | None, service: str, address: str, owners: set[str]) -> None:
        """``who`` may register an instance of ``service`` at ``address``, where instances
        of ``owners`` are registered already, or this raises.

        Sidecars expect the service's identity at each address it is registered at:
        another service's instance at the same address would change what they expect
        there and cut the real one off. Operators may overrule that.
        """
        self._sole(who, service, owners, f"register service {service!r} at {address}", "is there")

    def _sole(
        self, who: SpiffeId | None, service: str, owners: set[str], doing: str, holding: str
    ) -> None:
        """``service`` must be the only one among ``owners`` of what it asks for."""
        known = self._known(who)
        if known is None or known.kind == "operator":
            return
        taken = sorted(owners - {service})
        if taken:
            raise PermissionDenied(f"{known} may not {doing}: service {taken[0]!r} {holding}")

    def write(self, who: SpiffeId | None, action: str, service: str) -> None:
        """``who`` may ``action`` an instance of ``service``, or this raises."""
        known = self._known(who)
        if known is None or known.kind == "operator":
            return
        if known.kind != "svc" or known.name != service:
            raise PermissionDenied(f"{known} may not {action} an instance of service {service!r}")
