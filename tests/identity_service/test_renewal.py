"""Certificates kept fresh against a real identity server: renewed before they expire,
and held through an outage of the server."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging

from identity.ca import CA, init_ca
from identity.tokens import create_token
from identity.workload import Credentials
from identity_service.server import IdentityServer
from shoal_core.backoff import Backoff
from shoal_core.certify_client import certify
from shoal_core.renewal import CertificateKeeper, Certify

TD = "shoal.local"
SHORT = dt.timedelta(seconds=3)
LIFE = dt.timedelta(seconds=14)  # for the outage test: see there


def _certify_at(address: str, ca: CA, token: str) -> Certify:
    async def certify_once(held: Credentials | None) -> Credentials:
        return await certify(
            address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=token, current=held,
            timeout=2,
        )  # fmt: skip

    return certify_once


async def test_a_short_lived_certificate_is_renewed_before_it_expires(tmp_path):
    ca = init_ca(tmp_path / "ca", TD)
    token, _ = create_token(ca, "worker", dt.timedelta(minutes=5))
    seen: list[Credentials] = []
    async with IdentityServer("127.0.0.1:0", ca, leaf_ttl=SHORT) as server:
        keeper = CertificateKeeper(_certify_at(server.address, ca, token), on_change=seen.append)
        first = await keeper.start()
        try:
            deadline = asyncio.get_running_loop().time() + 8
            while asyncio.get_running_loop().time() < deadline:
                # Never a moment without a valid certificate.
                assert keeper.current().leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
                await asyncio.sleep(0.1)
        finally:
            await keeper.close()
    assert keeper.renewals >= 3 and keeper.failures == 0
    assert seen[0] is first and len(seen) == keeper.renewals + 1
    assert {str(c.identity) for c in seen} == {"spiffe://shoal.local/svc/worker"}
    assert len({c.leaf.serial_number for c in seen}) == len(seen)
    assert len({c.key.public_key().public_numbers().x for c in seen}) == len(seen)


async def test_while_the_identity_server_is_down_the_old_certificate_stays_and_renewal_resumes(
    tmp_path, caplog
):
    ca = init_ca(tmp_path / "ca", TD)
    token, _ = create_token(ca, "worker", dt.timedelta(minutes=5))
    caplog.set_level(logging.WARNING, logger="shoal_core.renewal")
    # Renewal comes due at 70 % +- 10 % of 14 s (8.4 to 11.2 s), while the server is
    # down; it is back at 11.5 s, over a second before the leaf expires (its expiry is
    # whole seconds, so up to one early): time for several retries.
    server = IdentityServer("127.0.0.1:0", ca, leaf_ttl=LIFE)
    await server.start()
    port = server.port
    keeper = CertificateKeeper(
        _certify_at(f"127.0.0.1:{port}", ca, token), retry=Backoff(initial=0.2, maximum=0.5)
    )
    first = await keeper.start()
    await server.close(0)
    try:
        await asyncio.sleep(11.5)
        # Renewal was due and failed: the first certificate is still held.
        assert keeper.failures >= 1 and keeper.current() is first
        assert "renewing spiffe://shoal.local/svc/worker failed" in caplog.text
        assert token not in caplog.text
        async with IdentityServer(f"127.0.0.1:{port}", ca, leaf_ttl=LIFE):
            for _ in range(50):
                if keeper.current() is not first:
                    break
                await asyncio.sleep(0.1)
        assert keeper.current() is not first and keeper.renewals >= 1
    finally:
        await keeper.close()


async def test_close_stops_renewing(tmp_path):
    ca = init_ca(tmp_path / "ca", TD)
    token, _ = create_token(ca, "worker", dt.timedelta(minutes=5))
    async with IdentityServer("127.0.0.1:0", ca, leaf_ttl=dt.timedelta(seconds=1)) as server:
        calls = 0
        inner = _certify_at(server.address, ca, token)

        async def counted(held: Credentials | None) -> Credentials:
            nonlocal calls
            calls += 1
            return await inner(held)

        keeper = CertificateKeeper(functools.partial(counted))
        await keeper.start()
        await keeper.close()
        before = calls
        await asyncio.sleep(1.5)
        assert calls == before
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "certificate-renewal"]


async def test_after_an_outage_longer_than_the_leafs_life_the_token_certifies_again(
    tmp_path, caplog
):
    ca = init_ca(tmp_path / "ca", TD)
    token, _ = create_token(ca, "worker", dt.timedelta(minutes=5))
    caplog.set_level(logging.WARNING, logger="shoal_core.renewal")
    server = IdentityServer("127.0.0.1:0", ca, leaf_ttl=SHORT)
    await server.start()
    port = server.port
    keeper = CertificateKeeper(
        _certify_at(f"127.0.0.1:{port}", ca, token), retry=Backoff(initial=0.2, maximum=0.5)
    )
    first = await keeper.start()
    await server.close(0)
    try:
        await asyncio.sleep(SHORT.total_seconds() + 1)
        assert first.leaf.not_valid_after_utc < dt.datetime.now(dt.UTC)
        assert "the current certificate has EXPIRED" in caplog.text
        async with IdentityServer(f"127.0.0.1:{port}", ca, leaf_ttl=dt.timedelta(minutes=5)):
            for _ in range(50):
                if keeper.current() is not first:
                    break
                await asyncio.sleep(0.1)
        held = keeper.current()
        assert held is not first and held.leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
        assert str(held.identity) == "spiffe://shoal.local/svc/worker"
    finally:
        await keeper.close()
