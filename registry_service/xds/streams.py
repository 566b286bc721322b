"""One ADS stream's state of the world: what the client subscribed to, per type, and
what it was last sent (protobuf only, no gRPC).

The protocol, as the xDS spec and gRFC A27 have it: the client asks for a type with
the names it wants; the server answers with every resource it has of those names, a
``version_info`` and a ``nonce``. The client then sends the same type again with that
nonce: with ``version_info`` the new version (an ACK) or the previous one and an
``error_detail`` (a NACK: it keeps what it had). A request carrying an older nonce
crossed a response in flight and is ignored; the client's answer to that response
will say what it wants. We resend a type only when its subscription or its resources
changed, never to answer an ACK or a NACK as such: resending what was refused would
be refused again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from registry_service.errors import LimitReached
from registry_service.xds.catalog import WILDCARD_TYPES, Catalog, Resource
from registry_service.xds.resources import TYPES

__all__ = ["StreamState"]

logger = logging.getLogger(__name__)

WILDCARD = "*"
_MAX_NODE_ID = 256
_MAX_ERROR = 2048


@dataclass(slots=True)
class _Subscription:
    """One type on one stream. ``names`` None: every resource of the type."""

    names: frozenset[str] | None
    version: int = 0
    nonce: str = ""
    # name -> digest of what the client was last sent; compared, never resent from.
    sent: dict[str, bytes] = field(default_factory=dict)
    # Set when the client's subscription changed: answer even if nothing else did.
    due: bool = True


class StreamState:
    """The subscriptions of one stream, at most ``max_names`` names over all types."""

    def __init__(self, max_names: int) -> None:
        self._max_names = max_names
        self._subs: dict[str, _Subscription] = {}
        self._nonces = 0
        self.node_id = ""

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> bool:
        """Take one request in; True when a response is now due. Raises LimitReached
        when the stream would hold more than ``max_names`` names."""
        if req.node.id:
            # Only the first request must carry the node; kept short, it is for logs.
            self.node_id = req.node.id[:_MAX_NODE_ID]
        type_url = req.type_url
        if type_url not in TYPES:
            # Another type (scoped routes, secrets...): we have none of it to serve.
            logger.debug("xds client %s asked for unserved type %s", self.node_id, type_url)
            return False
        names = self._names(type_url, req.resource_names)
        sub = self._subs.get(type_url)
        if sub is not None and req.response_nonce and req.response_nonce != sub.nonce:
            return False  # stale: the answer to our latest response will follow
        if sub is not None and req.response_nonce and req.HasField("error_detail"):
            # repr: the client chose both strings, and a log line must stay one line.
            logger.warning(
                "xds client %r rejected %s version %d: %r",
                self.node_id,
                _short(type_url),
                sub.version,
                req.error_detail.message[:_MAX_ERROR],
            )
        self._check_limit(type_url, names)
        if sub is None or not req.response_nonce:
            # A new subscription, or a client that reconnected or restarted this type:
            # it gets the current state, whatever version it says it holds.
            self._subs[type_url] = _Subscription(names)
            return True
        if names != sub.names:
            # New names need an answer, even "none of those", or the client waits for
            # its does-not-exist timer; names dropped need none.
            added = names is None or sub.names is not None and bool(names - sub.names)
            sub.names = names
            sub.due = sub.due or added
            if names is not None:
                sub.sent = {name: d for name, d in sub.sent.items() if name in names}
        return sub.due

    def responses(self, catalog: Catalog) -> list[discovery_pb2.DiscoveryResponse]:
        """What to send now: each type whose subscription or resources changed since it
        was last sent, as a new version of the whole subscribed set."""
        out = []
        for type_url in TYPES:
            sub = self._subs.get(type_url)
            if sub is None:
                continue
            found = catalog.lookup(type_url, sub.names)
            digests = {name: res.digest for name, res in found.items()}
            if not sub.due and digests == sub.sent:
                continue
            out.append(self._response(type_url, sub, found))
            sub.sent = digests
            sub.due = False
        return out

    def _response(
        self, type_url: str, sub: _Subscription, found: dict[str, Resource]
    ) -> discovery_pb2.DiscoveryResponse:
        self._nonces += 1
        sub.version += 1
        sub.nonce = str(self._nonces)
        return discovery_pb2.DiscoveryResponse(
            type_url=type_url,
            version_info=str(sub.version),
            nonce=sub.nonce,
            resources=[found[name].packed for name in sorted(found)],
        )

    def _names(self, type_url: str, asked: list[str]) -> frozenset[str] | None:
        if WILDCARD in asked or (not asked and type_url in WILDCARD_TYPES):
            return None
        return frozenset(asked)

    def _check_limit(self, type_url: str, names: frozenset[str] | None) -> None:
        held = sum(
            len(sub.names)
            for other, sub in self._subs.items()
            if other != type_url and sub.names is not None
        )
        if names is not None and held + len(names) > self._max_names:
            raise LimitReached(
                f"an xDS stream may subscribe to at most {self._max_names} resource names "
                f"(xds_max_names); this one asked for {held + len(names)}"
            )


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]
