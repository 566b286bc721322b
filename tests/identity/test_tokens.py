"""Join tokens: bound to one service and one mesh, expiring, and impossible to forge."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from identity.ca import init_ca
from identity.spiffe import SpiffeId
from identity.tokens import TokenError, create_token, verify_token


@pytest.fixture
def ca(tmp_path):
    return init_ca(tmp_path / "ca", "shoal.local")


def test_a_token_admits_exactly_the_service_it_was_made_for(ca):
    token, claims = create_token(ca, "worker", dt.timedelta(hours=1))
    checked = verify_token(ca, token)
    assert checked == claims
    assert checked.identity == SpiffeId.service("shoal.local", "worker")


def test_a_token_expires(ca):
    made = dt.datetime.now(dt.UTC)
    token, _ = create_token(ca, "worker", dt.timedelta(seconds=60), now=made)
    verify_token(ca, token, now=made + dt.timedelta(seconds=59))
    with pytest.raises(TokenError, match="for worker expired"):
        verify_token(ca, token, now=made + dt.timedelta(seconds=60))


def _reclaim(token: str, **changes: object) -> str:
    """The token with its claims changed and its signature kept."""
    prefix, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return f"{prefix}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{signature}"


def test_a_worker_token_edited_to_say_client_is_refused(ca):
    token, _ = create_token(ca, "worker", dt.timedelta(hours=1))
    with pytest.raises(TokenError, match="not issued by this mesh's CA"):
        verify_token(ca, _reclaim(token, svc="client"))
    with pytest.raises(TokenError, match="not issued by this mesh's CA"):
        verify_token(ca, _reclaim(token, exp=4102444800))


def test_another_meshs_token_is_refused(ca, tmp_path):
    other = init_ca(tmp_path / "other", "shoal.local")
    token, _ = create_token(other, "worker", dt.timedelta(hours=1))
    with pytest.raises(TokenError, match="not issued by this mesh's CA"):
        verify_token(ca, token)


@pytest.mark.parametrize(
    "junk",
    ["", "shoal1", "shoal1..", "shoal2.e30.AA", "shoal1.!!!.AA", "x" * 5000, "a.b.c.d"],
)
def test_garbage_is_not_a_token_and_the_error_never_repeats_it(ca, junk):
    with pytest.raises(TokenError) as caught:
        verify_token(ca, junk)
    assert str(caught.value) == "not a Shoal join token"


def test_the_refusal_never_contains_the_token(ca):
    token, _ = create_token(ca, "worker", dt.timedelta(seconds=1))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    with pytest.raises(TokenError) as caught:
        verify_token(ca, token, now=later)
    assert token.split(".")[2] not in str(caught.value)
    assert token.split(".")[1] not in str(caught.value)
