"""Join tokens: a workload's proof, before it has a certificate, of the service it is.

A token is ``shoal1.<claims>.<signature>``: base64url JSON claims (trust domain, the
identity's kind and name, expiry, a random id) signed by the CA's issuing key (ECDSA
P-256, SHA-256).
Whoever holds the issuer's certificate can check one; only the CA can make one. A token
for ``worker`` can only ever obtain a ``worker`` identity: the service is in what is
signed, and the CA takes it from there, never from the request.

Tokens are secrets: give them to a process as ``SHOAL_TOKEN`` or in a file, never as a
flag (``ps`` shows flags to every user).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca import CA
from identity.spiffe import SpiffeError, SpiffeId

__all__ = ["Claims", "TokenError", "create_token", "verify_token"]

_PREFIX = "shoal1"
# A token is a header value and a line in a file: anything longer is not one of ours.
_MAX_LENGTH = 1024


class TokenError(Exception):
    """A token that does not admit anyone; the message says why (never the token)."""


@dataclass(frozen=True, slots=True)
class Claims:
    trust_domain: str
    kind: str
    name: str
    expires: dt.datetime
    token_id: str

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.kind, self.name)

    @property
    def service(self) -> str:
        """The service admitted (for ``svc`` tokens; the registry's is ``registry``)."""
        return self.name or self.kind


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def create_token(
    ca: CA, who: str | SpiffeId, ttl: dt.timedelta, *, now: dt.datetime | None = None
) -> tuple[str, Claims]:
    """A token admitting ``who`` (a service name, or any identity of the mesh, such as
    the registry's) for ``ttl``, and what it claims."""
    if ttl <= dt.timedelta(0):
        raise TokenError("a token's lifetime must be positive")
    if isinstance(who, str):
        who = SpiffeId.service(ca.trust_domain, who)  # a name the mesh can issue
    if who.trust_domain != ca.trust_domain:
        raise TokenError(f"{who} is not in this mesh's trust domain {ca.trust_domain}")
    now = now or dt.datetime.now(dt.UTC)
    # Whole seconds, as signed: the claims returned are the ones a check will read.
    expires = (now + ttl).replace(microsecond=0)
    claims = Claims(ca.trust_domain, who.kind, who.name, expires, secrets.token_hex(8))
    body = _b64(
        json.dumps(
            {"td": claims.trust_domain, "kind": who.kind, "name": who.name,
             "exp": int(claims.expires.timestamp()), "jti": claims.token_id},
            separators=(",", ":"), sort_keys=True,
        ).encode()
    )  # fmt: skip
    signed = f"{_PREFIX}.{body}".encode()
    signature = ca.issuer_key.sign(signed, ec.ECDSA(hashes.SHA256()))
    return f"{_PREFIX}.{body}.{_b64(signature)}", claims


def verify_token(ca: CA, token: str, *, now: dt.datetime | None = None) -> Claims:
    """What a token admits, once its signature, trust domain and expiry check out."""
    token = token.strip()
    parts = token.split(".")
    if len(token) > _MAX_LENGTH or len(parts) != 3 or parts[0] != _PREFIX:
        raise TokenError("not a Shoal join token")
    try:
        signature = _unb64(parts[2])
        raw = json.loads(_unb64(parts[1]))
    except (binascii.Error, ValueError):
        raise TokenError("not a Shoal join token") from None
    # The issuer's key, or one a rotation retired (its tokens stay good until they expire
    # or the rotation finishes, so a workload restarted meanwhile can still join).
    keys = [issuer.public_key() for issuer in ca.issuers]  # load_ca checked issuer.key's
    signed = f"{parts[0]}.{parts[1]}".encode()
    for key in keys:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        try:
            key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
            break
        except InvalidSignature:
            continue
    else:
        raise TokenError("the token was not issued by this mesh's CA")
    if not isinstance(raw, dict):
        raise TokenError("not a Shoal join token")
    try:
        claims = Claims(
            str(raw["td"]), str(raw["kind"]), str(raw["name"]),
            dt.datetime.fromtimestamp(int(raw["exp"]), dt.UTC), str(raw["jti"]),
        )  # fmt: skip
        claims.identity  # noqa: B018 - validates the kind and name
    except (KeyError, TypeError, ValueError, SpiffeError):
        raise TokenError("the token's claims are malformed") from None
    if claims.trust_domain != ca.trust_domain:
        raise TokenError(f"the token is for trust domain {claims.trust_domain}")
    if (now or dt.datetime.now(dt.UTC)) >= claims.expires:
        raise TokenError(
            f"the token for {claims.service} expired at {claims.expires:%Y-%m-%d %H:%M:%SZ}"
        )
    return claims
