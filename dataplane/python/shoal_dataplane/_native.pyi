class DataPlane:
    """Forwards every call on its listen address; asks ``control`` where each goes."""

    def __init__(
        self, control: object, *, replay_limit: int = ..., idle_timeout: float = ...
    ) -> None: ...
    def start(self, listen: str) -> int:
        """Bind ``listen`` and serve on a thread of its own; the port bound."""
    def set_local(self, address: str) -> None:
        """Where the sidecar's own services (health, reflection) are served."""
    def warm(self, address: str) -> None: ...
    def forget(self, address: str) -> None: ...
    def breaker(self, key: str) -> tuple[int, int, int]:
        """The circuit breaker of ``key``: in flight, pending, rejected."""
    def connections(self) -> int: ...
    def stop(self, grace: float) -> None:
        """Stop taking calls, let running ones finish for ``grace`` seconds, end the rest."""
