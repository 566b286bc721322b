"""What the native data plane asks, call by call: where to, and whether to retry (no gRPC).

The data plane (``shoal_dataplane``, in Rust) moves the bytes; every decision stays
here, in the same domain objects as before: the router picks the cluster, the
cluster's balancer the endpoint, outlier detection and the retry budget judge the
outcome. ``Control`` is the data plane's ``ControlPlane`` and ``Call`` its
``CallControl`` (typed in ``shoal_dataplane``); it calls, from its own thread:

- ``Control.begin(path, target, inbound, metadata, remaining, peer)``: authorize an
  inbound call by the caller's SPIFFE ID (``peer``) and the mesh's policy, then route
  the call; an ``Admission`` (the call's ``Call``, its cluster's ``Breaker``, whether it goes
  out to the mesh, the per-try timeout, and its first pick) or a ``Refusal``;
- ``Call.pick()``: the ``Target`` of the next try, or a ``Refusal``;
- ``Call.failed(code, replayable, elapsed)``: a try ended before the upstream
  answered; the pause before a retry, or ``None``;
- ``Call.finish(code, latency, elapsed, request_bytes, response_bytes)``: the call
  ended; ``latency`` (the last try's time to the response headers) when the upstream
  answered; ``elapsed``, its whole time; the message bytes each way;
- ``Control.connection_state(address, state)``: an upstream connection changed;
- ``Control.reflect(request)``: answer a reflection request about the sidecar's own
  services (its app asked).

The data plane bounds each try by the per-try timeout and what is left of the
caller's deadline. Status codes are gRPC's numbers. Everything here is synchronous
and quick: the data plane waits for it. ``connection_state`` is the one call whose
effect belongs to the event loop (the endpoint tables): it is handed over there.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Sequence

from shoal_dataplane import Admission, Refusal, Target

from proxy_sidecar.authz import PolicyWatch
from proxy_sidecar.cluster import Cluster
from proxy_sidecar.endpoints import Endpoint, EndpointTable
from proxy_sidecar.errors import NoHealthyEndpoint, RouteError, UnknownService
from proxy_sidecar.golden import GoldenStats, Series, caller_name
from proxy_sidecar.reflect import answer as reflection_answer
from proxy_sidecar.routing import Route, Router, parse_method
from shoal_core.codes import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    PERMISSION_DENIED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    ErrorCodes,
    code_name,
)

__all__ = ["Call", "Control", "route_refusal"]

_ROUTE_CODES = ErrorCodes[int](
    {UnknownService: UNIMPLEMENTED, NoHealthyEndpoint: UNAVAILABLE}, default=UNAVAILABLE
)
# Below this much time left, a retry could not finish: give the caller the failure.
_MIN_RETRY_TIME = 0.005
_MAX_CACHED_ROUTES = 4096
_MALFORMED = Refusal(UNIMPLEMENTED, "shoal: the method path is not /package.Service/Method")
_NO_APP = Refusal(UNIMPLEMENTED, "shoal: this sidecar has no app to deliver calls to")


def route_refusal(exc: RouteError) -> Refusal:
    """What the caller gets when a call cannot be routed."""
    return Refusal(_ROUTE_CODES(exc), str(exc))


def _refused(series: Series, refusal: Refusal) -> Refusal:
    """A call refused before it went anywhere still counts, with its status."""
    series.started()
    series.finished(refusal.code, 0.0)
    return refusal


class Call:
    """One forwarded call's tries: endpoint choice, retry decisions, and its outcome."""

    __slots__ = (
        "cluster",
        "_method",
        "_key",
        "_rng",
        "_clock",
        "_deadline",
        "_tried",
        "_at",
        "_now",
        "_series",
    )

    def __init__(
        self,
        cluster: Cluster,
        method: str,
        key: str | None,
        remaining: float | None,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        series: Series | None = None,
    ) -> None:
        """``series``: where the call's golden metrics go (see ``golden``)."""
        self.cluster = cluster
        self._method = method
        self._key = key
        self._rng = rng
        self._clock = clock
        # One reading of the clock serves the whole admission.
        now = clock()
        self._deadline = None if remaining is None else now + remaining
        # Allocated on the first retry only: most calls never retry.
        self._tried: Sequence[Endpoint] = ()
        # The endpoint of the try under way, if any.
        self._at: Endpoint | None = None
        cluster.requests += 1
        cluster.budget.record_request(now)
        self._now: float | None = now
        self._series = series
        if series is not None:
            series.started()

    def pick(self) -> Target | Refusal:
        """The next try's endpoint (another than those tried when possible)."""
        now, self._now = self._now, None
        try:
            endpoint = self.cluster.pick(self._key, self._tried, now)
        except RouteError as exc:
            return route_refusal(exc)
        endpoint.in_flight += 1
        self._at = endpoint
        return endpoint.target

    def failed(self, code: int, replayable: bool, elapsed: float) -> float | None:
        """A try ended with ``code`` before an answer: record it; the backoff, or ``None``."""
        endpoint = self._at
        if endpoint is None:
            return None
        self._at = None
        endpoint.in_flight -= 1
        cluster = self.cluster
        now = self._clock()
        left = None if self._deadline is None else self._deadline - now
        # DEADLINE_EXCEEDED with time left is the per-try timeout, not the caller's.
        try_timed_out = code == DEADLINE_EXCEEDED and (left is None or left > 0.0)
        cluster.record(endpoint, code != UNAVAILABLE and not try_timed_out, elapsed)
        retry = cluster.retry
        if not replayable or len(self._tried) + 1 >= retry.max_attempts:
            return None
        if code != UNAVAILABLE and not (
            retry.is_idempotent(self._method)
            and (try_timed_out or code_name(code) in retry.retry_on)
        ):
            return None
        pause = cluster.backoff.delay(len(self._tried), self._rng)
        if left is not None and left <= pause + _MIN_RETRY_TIME:
            return None
        if not cluster.budget.try_retry():
            return None
        self._tried = [*self._tried, endpoint]
        cluster.retries += 1
        return pause

    def finish(
        self,
        code: int,
        latency: float | None,
        elapsed: float,
        request_bytes: int = 0,
        response_bytes: int = 0,
    ) -> None:
        """The call ended with ``code``; ``latency`` when the last try's upstream answered;
        ``elapsed``, the call's whole time as the data plane measured it (it tells us a
        little later, in a batch: our own clock would count that delay too); the
        message bytes read from the caller and sent back to it."""
        endpoint = self._at
        if endpoint is not None:
            self._at = None
            endpoint.in_flight -= 1
            if latency is not None:
                self.cluster.record(endpoint, True, latency)
        self.cluster.count(code)
        if self._series is not None:
            self._series.finished(code, elapsed, request_bytes, response_bytes)


class Control:
    """Routes calls for the data plane, and applies what it reports about connections."""

    def __init__(
        self,
        router: Router,
        tables: Iterable[EndpointTable],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy: PolicyWatch | None = None,
        service: str | None = None,
        identity: str | None = None,
    ) -> None:
        """``policy`` and ``service`` (this sidecar's app's): who may call in;
        ``identity``: this sidecar's SPIFFE ID, the caller of its outbound calls."""
        self.golden = GoldenStats()
        self._policy = policy
        self._service = service
        self._own_name = caller_name(identity)
        self._router = router
        self._tables = tuple(tables)
        self._rng = rng or random.Random()
        self._clock = clock
        # Per path, direction and peer: what the path says, where its calls are counted.
        self._routes: dict[tuple[str, bool, str | None], tuple[Route, Series]] = {}
        self._loop = asyncio.get_running_loop()

    def begin(
        self,
        path: str,
        target: str | None,
        inbound: bool,
        metadata: Sequence[tuple[str, str]],
        remaining: float | None,
        peer: str | None,
    ) -> Admission | Refusal:
        """Route a new call; an inbound one only if the policy lets ``peer`` (the caller's
        SPIFFE ID under mTLS; None without it) call ``path`` on our service."""
        cached = self._routes.get((path, inbound, peer))
        if cached is None:
            route = parse_method(path)
            if route is None:
                return _MALFORMED
            caller = caller_name(peer) if inbound else self._own_name
            cached = (route, self.golden.series(inbound, route.service, route.method, caller))
            if len(self._routes) < _MAX_CACHED_ROUTES:
                self._routes[(path, inbound, peer)] = cached
        route, series = cached
        router = self._router
        if inbound:
            # From another sidecar, on the mesh-facing listener: only ever to our app.
            if router.local is None:
                return _NO_APP
            policy = self._policy
            if policy is not None and self._service is not None:
                decision = policy.decide(peer, self._service, path)
                if not decision.allowed:
                    message = policy.denial_message(peer, self._service, path, decision)
                    return _refused(series, Refusal(PERMISSION_DENIED, f"shoal: {message}"))
            cluster, outbound = router.local, False
        else:
            try:
                cluster = router.cluster(target or route.service)
            except RouteError as exc:
                return _refused(series, route_refusal(exc))
            outbound = True
        key: str | None = None
        if cluster.hash_key is not None:
            for name, value in metadata:
                if name == cluster.hash_key:
                    key = value
                    break
        call = Call(
            cluster, route.method, key, remaining, rng=self._rng, clock=self._clock, series=series
        )
        first = call.pick()
        try:
            return Admission(call, cluster.breaker, outbound, cluster.per_try_timeout, first)
        except Exception:
            # Never a call in flight that the data plane does not know of.
            call.finish(INTERNAL, None, 0.0)
            raise

    def identify(self, identity: str) -> None:
        """This sidecar's SPIFFE ID, once it has certified: the caller its outbound
        calls are counted under from now on."""
        self._own_name = caller_name(identity)
        self._routes.clear()

    def reflect(self, request: bytes) -> bytes:
        """The answer to one server reflection request about the sidecar's own services."""
        return reflection_answer(request)

    def connection_state(self, address: str, state: str) -> None:
        """From the data plane's thread: apply on the event loop, where the tables live."""
        self._loop.call_soon_threadsafe(self._apply_state, address, state)

    def _apply_state(self, address: str, state: str) -> None:
        # A failing connection makes its endpoint unroutable at once, before a call fails.
        reachable = state != "TRANSIENT_FAILURE"
        for table in self._tables:
            changed = False
            for endpoint in table.endpoints():
                if endpoint.address != address:
                    continue
                endpoint.state = state
                if endpoint.reachable != reachable:
                    endpoint.reachable = reachable
                    changed = True
            if changed:
                table.touch()
