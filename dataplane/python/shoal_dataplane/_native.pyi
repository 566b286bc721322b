from collections.abc import Callable
from typing import Any

class Refusal:
    """A call the control plane will not route: the gRPC status (1..16) the caller gets."""

    code: int
    message: str
    def __init__(self, code: int, message: str) -> None: ...

class Target:
    """One endpoint a try can go to; made once per endpoint and handed out for each pick."""

    address: str
    instance: str
    def __init__(self, address: str, instance: str) -> None: ...

class Breaker:
    """One cluster's circuit breaker: the data plane holds its slots and queue places."""

    in_flight: int
    pending: int
    rejected: int
    max_in_flight: int
    max_pending: int
    def __init__(self, *, max_in_flight: int, max_pending: int) -> None: ...

class Admission:
    """A call that may go ahead: its state, its breaker, and its first try's target."""

    call: Any
    breaker: Breaker
    outbound: bool
    per_try_timeout: float | None
    first: Target | Refusal

    def __init__(
        self,
        call: Any,
        breaker: Breaker,
        outbound: bool,
        per_try_timeout: float | None,
        first: Target | Refusal,
    ) -> None: ...

class OwnCall:
    """A call the control plane made on the data plane."""

    def cancel(self) -> None:
        """End the call; its ``done`` is then not called."""

class DataPlane:
    """Serves the sidecar's listeners; asks ``control`` where each call goes.

    With ``secure=True`` the mesh-facing (inbound) listener takes only TLS 1.3 with a
    client certificate that chains to the trust bundle (ALPN h2), and the pool reaches
    each address as ``expect_peer`` says: over mutual TLS to the SPIFFE ID named, in
    plaintext when told ``None``, and not at all when nothing was said (UNAVAILABLE,
    "shoal: no mesh identity is known for ADDRESS"). The app-facing (outbound)
    listener is plaintext either way. Without ``secure`` everything is plaintext.

    With ``trace_collector`` (``host:port`` of an OTLP/gRPC collector, plaintext) every
    call continues or starts a W3C trace and, when sampled, records a span, exported in
    batches; traces started here are kept at ``trace_sample``. Python sees none of it.
    """

    def __init__(
        self,
        control: Any,
        *,
        replay_limit: int = ...,
        idle_timeout: float = ...,
        max_connections: int = ...,
        max_streams: int = ...,
        connection_idle_timeout: float = ...,
        secure: bool = False,
        trace_collector: str | None = None,
        trace_sample: float = 0.01,
    ) -> None: ...
    def set_trace_service(self, name: str) -> None:
        """The name this sidecar's spans carry (OpenTelemetry's ``service.name``)."""
    def trace_counts(self) -> tuple[int, int]:
        """Spans exported to the collector, and spans dropped; (0, 0) without tracing."""
    def start(self, outbound: str, inbound: str | None = None) -> tuple[int, int | None]:
        """Bind the app-facing (and mesh-facing) listeners and serve them on a thread of
        their own; the ports bound. A secure data plane needs ``set_identity`` (or, to
        certify over its own calls, ``set_trust_bundle``) first
        (RuntimeError otherwise)."""
    def set_identity(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        """Install or replace the mesh identity: the leaf certificate then its issuers,
        the leaf's private key (PKCS#8 PEM) and the trust bundle (one or more roots).

        Connections opened from now on, in both directions, use it; open ones keep the
        one they were made with. ValueError (one line) for bad PEM, a key that is not
        the leaf's, a leaf with no SPIFFE ID, or an empty bundle."""
    def set_trust_bundle(self, bundle_pem: bytes) -> None:
        """Trust ``bundle_pem``'s roots for mTLS connections made before
        ``set_identity``: they check the server as usual but show no certificate, which
        is how a sidecar asks the identity server for its first one. Inbound
        handshakes still need an identity. ValueError (one line) for a bad bundle."""
    def expect_peer(self, address: str, peer: str | None) -> None:
        """On a secure data plane, how calls to ``address`` go: over mutual TLS to a
        server whose certificate chains to the bundle and names exactly ``peer`` (a
        SPIFFE ID, e.g. ``spiffe://shoal.local/svc/worker``) as its URI SAN, or in
        plaintext with ``None`` (the sidecar's own app on loopback). Applies to
        ``call`` and ``warm`` too. A change closes the address's connection once its
        calls are done, as ``forget`` does; ``forget`` keeps the rule. Ignored when
        not secure. ValueError if ``peer`` is not a SPIFFE ID."""
    def handshakes(self) -> int:
        """TLS handshakes completed, both directions."""
    def handshake_failures(self) -> int:
        """TLS handshakes that failed (refused certificates, plaintext clients, time
        outs), both directions."""
    def alive(self) -> bool:
        """Whether the data plane's thread is serving: started, not stopped, not dead."""
    def set_serving(self, serving: bool) -> None:
        """What the sidecar's own grpc.health.v1 says of it: SERVING, or NOT_SERVING."""
    def call(
        self,
        address: str,
        path: str,
        message: bytes,
        timeout: float | None,
        on_message: Callable[[bytes], object],
        done: Callable[[int, str], object],
    ) -> OwnCall:
        """A gRPC call of the control plane's own on the data plane's connections: each
        response message to ``on_message``, then the status to ``done``, both on the data
        plane's thread."""
    def warm(self, address: str) -> None:
        """Connect to ``address`` ahead of its first call."""
    def forget(self, address: str) -> None:
        """``address`` left the mesh: close its connection once its calls are done."""
    def connections(self) -> int:
        """Open upstream connections."""
    def stop(self, grace: float) -> None:
        """Stop taking calls, let running ones finish for ``grace`` seconds, end the rest."""
