"""The sidecar's data plane with a control plane that decides nothing: its floor.

``python -m bench.sidecar_bench.floor UPSTREAM`` serves on a port of its own and
forwards every call to UPSTREAM, with the same data plane as the sidecar but a
control plane that answers each ``begin`` with one premade admission and does no
routing, balancing or accounting. Set beside the sidecar and nginx, it splits the
sidecar's per-call cost into what its data plane (h2, Tokio, the entry into Python)
costs whatever Python decides, and what the control plane adds.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from shoal_dataplane import Admission, Breaker, DataPlane, Refusal, Target


class _Call:
    __slots__ = ("_target",)

    def __init__(self, target: Target) -> None:
        self._target = target

    def pick(self) -> Target | Refusal:
        return self._target

    def failed(self, code: int, replayable: bool, elapsed: float) -> float | None:
        return None

    def finish(
        self,
        code: int,
        latency: float | None,
        elapsed: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        return None


class _Floor:
    def __init__(self, upstream: str) -> None:
        self._target = Target(upstream, "floor")
        self._call = _Call(self._target)
        self._breaker = Breaker(max_in_flight=100_000, max_pending=100_000)

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Sequence[tuple[str, str]],
        remaining: float | None,
        peer: str | None,
    ) -> Admission | Refusal:
        # Not outbound: no shoal-hop header, so a second floor takes it on its app port.
        return Admission(self._call, self._breaker, False, None, self._target)

    def reflect(self, request: bytes) -> bytes:
        return b""

    def connection_state(self, address: str, state: str) -> None:
        return None


def main() -> int:
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    plane = DataPlane(_Floor(sys.argv[1]))
    port, _ = plane.start("127.0.0.1:0")
    # The ready line procs.shoal() reads, on stdout.
    print(f"floor serving on 127.0.0.1:{port}", flush=True)
    signal.sigwait(signals)
    plane.stop(0.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
