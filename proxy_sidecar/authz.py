"""The mesh's authorization policy, followed from the registry, for inbound calls.

``PolicyWatch`` keeps the newest policy of the registry's ``WatchPolicy`` stream.
When the stream breaks it keeps the last policy it had (fail-static: a registry
outage changes no one's rights) and reconnects with the project's backoff, to the
next registry replica when there are several, saying which version it holds so an
unchanged policy is not sent again. Until the first policy arrives the mesh default
applies: everything is allowed, as in a mesh that has never set a policy; ``start``
waits a moment for it so that, normally, no call is decided before it is known.

``decide`` is called by the data plane's thread for every inbound call, while the
event loop swaps in new policies: the policy and the decisions cached for it are one
reference, replaced whole, so a decision made under an old policy is never cached
under a new one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
from collections.abc import Sequence

from identity.authz import Decision, Policy, source_label
from identity.spiffe import SpiffeError, SpiffeId
from protos import registry_pb2 as pb
from proxy_sidecar.rpc import Follower, Rpc
from shoal_core.backoff import Attempts, Backoff
from shoal_core.config import ConfigError
from shoal_core.policy_wire import policy_from_pb
from shoal_core.replicas import Replicas

__all__ = ["PolicyWatch"]

logger = logging.getLogger(__name__)

_WATCH_POLICY = "/shoal.registry.v1.Registry/WatchPolicy"
_NO_POLICY = Policy()
# Distinct (peer, destination, method) answers kept per policy; past it the cache
# starts over, so callers inventing method names cannot grow it without bound.
_MAX_CACHED = 4096
# Distinct (source, destination) pairs counted; the rest are counted together.
_MAX_COUNTED = 1024
_OTHER = ("other", "other")


@functools.lru_cache(maxsize=1024)
def _parse_peer(peer: str) -> SpiffeId | None:
    # The data plane gives the verified certificate's URI SAN; one not of this mesh's
    # form is matched as a caller without identity (only "*" rules apply to it).
    try:
        return SpiffeId.parse(peer)
    except SpiffeError:
        return None


class PolicyWatch:
    """Follows ``Registry.WatchPolicy`` at ``registry`` (one address, several, or
    replicas shared with other users) through ``rpc``; owns its task."""

    def __init__(
        self,
        rpc: Rpc | None,
        registry: str | Sequence[str] | Replicas,
        *,
        trust_domain: str | None = None,
        backoff: Backoff | None = None,
        initial_sync: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        """``trust_domain``: the mesh's, when known; callers of another are matched as
        callers without identity. ``initial_sync``: how long ``start`` waits for the
        first policy. ``rpc`` may come at ``start`` instead: the sidecar's control plane
        holds the watch before its data plane can carry calls."""
        self._rpc = rpc
        self._replicas = replicas = Replicas.of(registry)
        self._trust_domain = trust_domain
        attempts = Attempts(backoff or Backoff(initial=0.1, maximum=5.0), rng or random.Random())
        self._follower = Follower(replicas, _WATCH_POLICY, pb.Policy, attempts, "policy watch")
        self._initial_sync = initial_sync
        self._state: tuple[Policy, dict[tuple[str | None, str, str], Decision]] = (
            _NO_POLICY,
            {},
        )
        self._received = asyncio.Event()
        self._lock = threading.Lock()
        self._denied: dict[tuple[str, str], int] = {}
        self.version = 0
        self.updates = 0

    @property
    def policy(self) -> Policy | None:
        """The policy in force; None until the first arrives (everything is allowed)."""
        return self._state[0] if self.version else None

    async def start(self, rpc: Rpc | None = None) -> None:
        """Start watching; wait up to ``initial_sync`` seconds for the first policy."""
        self._rpc = rpc or self._rpc
        if self._rpc is None:
            raise RuntimeError("PolicyWatch.start needs an Rpc")
        self._follower.start(
            self._rpc,
            lambda: pb.WatchPolicyRequest(known_version=self.version),
            self._apply,
            lambda: f"keeping policy version {self.version}",
        )
        try:
            await asyncio.wait_for(self._received.wait(), self._initial_sync)
        except TimeoutError:
            logger.warning(
                "no authorization policy from the registry at %s yet; allowing every call "
                "until one arrives",
                self._replicas.current,
            )

    async def close(self) -> None:
        await self._follower.close()

    def decide(self, peer_spiffe: str | None, destination_service: str, method: str) -> Decision:
        """Whether the caller whose certificate names ``peer_spiffe`` (None: no
        certificate) may call ``method`` on ``destination_service``; denials are counted."""
        policy, cache = self._state
        key = (peer_spiffe, destination_service, method)
        decision = cache.get(key)
        if decision is None:
            source = None if peer_spiffe is None else _parse_peer(peer_spiffe)
            decision = policy.decide(
                source, destination_service, method, trust_domain=self._trust_domain
            )
            if len(cache) >= _MAX_CACHED:
                cache.clear()
            cache[key] = decision
        if not decision.allowed:
            self._count_denial(peer_spiffe, destination_service)
        return decision

    def denial_message(
        self, peer_spiffe: str | None, destination_service: str, method: str, decision: Decision
    ) -> str:
        """What a denied caller is told: who it is, what it asked, and which rule said no."""
        label = source_label(None) if peer_spiffe is None else peer_spiffe
        return decision.denial(label, destination_service, method)

    def denied_counts(self) -> dict[tuple[str, str], int]:
        """Calls denied so far by (source, destination); the source is the caller's
        SPIFFE ID, or "" for a caller without one. Pairs past the first 1024 are counted
        as ("other", "other")."""
        with self._lock:
            return dict(self._denied)

    def _count_denial(self, peer: str | None, destination: str) -> None:
        key = (peer or "", destination)
        # The data plane's thread counts while the event loop may read: hence the lock,
        # taken only for denied calls.
        with self._lock:
            if key not in self._denied and len(self._denied) >= _MAX_COUNTED:
                key = _OTHER
            self._denied[key] = self._denied.get(key, 0) + 1

    @property
    def connected(self) -> bool:
        return self._follower.connected

    @property
    def reconnects(self) -> int:
        return self._follower.reconnects

    def _apply(self, msg: pb.Policy) -> None:
        try:
            policy = policy_from_pb(msg, source=f"policy version {msg.version}")
        except ConfigError as exc:
            # The registry validates what it is given, so this is a registry of another
            # version: keep what we have rather than guess.
            logger.error("ignoring an authorization policy that does not validate: %s", exc)
            return
        self._state = (policy, {})
        self.version = msg.version
        self.updates += 1
        self._received.set()
        logger.info(
            "authorization policy version %d: %d rules, default %s",
            msg.version,
            len(policy.rules),
            policy.default,
        )
