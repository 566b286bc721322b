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
    """Serves the sidecar's listeners; asks ``control`` where each call goes."""

    def __init__(
        self,
        control: Any,
        *,
        replay_limit: int = ...,
        idle_timeout: float = ...,
        max_connections: int = ...,
        max_streams: int = ...,
        connection_idle_timeout: float = ...,
    ) -> None: ...
    def start(self, outbound: str, inbound: str | None = None) -> tuple[int, int | None]:
        """Bind the app-facing (and mesh-facing) listeners and serve them on a thread of
        their own; the ports bound."""
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
    def warm(self, address: str) -> None: ...
    def forget(self, address: str) -> None: ...
    def connections(self) -> int: ...
    def stop(self, grace: float) -> None:
        """Stop taking calls, let running ones finish for ``grace`` seconds, end the rest."""
