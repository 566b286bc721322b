"""The identity server over real TLS: who gets which certificate, on what proof."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from cryptography import x509

from identity.ca import init_ca
from identity.certify import spiffe_id_of
from identity.spiffe import SpiffeId
from identity.tokens import create_token
from identity.workload import Credentials, new_request, renew_after
from identity_service.server import IdentityServer
from protos import identity_pb2 as pb
from protos import identity_pb2_grpc as pb_grpc
from shoal_core.certify_client import certify
from shoal_core.tls import bootstrap_credentials, target_options

TD = "shoal.local"


@pytest.fixture
def ca(tmp_path):
    return init_ca(tmp_path / "ca", TD)


@pytest.fixture
async def server(ca):
    async with IdentityServer("127.0.0.1:0", ca, leaf_ttl=dt.timedelta(minutes=5)) as running:
        yield running


def _token(ca, service="worker", ttl=dt.timedelta(minutes=5)):
    return create_token(ca, service, ttl)[0]


async def test_a_join_token_gets_a_leaf_for_its_service_and_the_bundle(ca, server):
    got = await certify(server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=_token(ca))
    assert got.identity == SpiffeId.service(TD, "worker")
    assert got.bundle_pem == ca.bundle_pem
    chain = x509.load_pem_x509_certificates(got.chain_pem)
    assert chain[0].public_key() == got.key.public_key()
    chain[0].verify_directly_issued_by(ca.issuer)
    life = chain[0].not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=4) < life <= dt.timedelta(minutes=5)


async def test_a_renewal_keeps_the_identity_on_a_new_key(ca, server):
    first = await certify(
        server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=_token(ca)
    )
    again = await certify(server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, current=first)
    assert again.identity == first.identity
    assert again.key.public_key() != first.key.public_key()
    assert again.leaf.serial_number != first.leaf.serial_number


async def _raw_certify(server, ca, request):
    options = target_options(SpiffeId(TD, "identity"))
    async with grpc.aio.secure_channel(
        server.address, bootstrap_credentials(ca.bundle_pem), options=options
    ) as channel:
        return await pb_grpc.IdentityStub(channel).Certify(request, timeout=5)


async def test_bad_proofs_are_unauthenticated_and_name_no_secret(ca, server, tmp_path):
    foreign = init_ca(tmp_path / "other", TD)
    _, csr = new_request()
    worker = await certify(
        server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=_token(ca)
    )
    # A renewal whose signature is over another CSR: a copied leaf without its key.
    stolen = worker.renewal(b"another csr")
    cases = {
        "no proof": pb.CertifyRequest(csr_pem=csr),
        "garbage token": pb.CertifyRequest(csr_pem=csr, token="shoal1.abc.def"),
        "foreign token": pb.CertifyRequest(csr_pem=csr, token=_token(foreign)),
        "stolen leaf": pb.CertifyRequest(
            csr_pem=csr,
            renewal=pb.Renewal(certificate_pem=stolen.certificate_pem, signature=stolen.signature),
        ),
        "foreign leaf": pb.CertifyRequest(
            csr_pem=csr,
            renewal=pb.Renewal(
                certificate_pem=foreign.issue(worker.key.public_key(), worker.identity).cert_pem,
                signature=worker.renewal(csr).signature,
            ),
        ),
    }
    for what, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _raw_certify(server, ca, request)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
        assert request.token == "" or request.token not in (caught.value.details() or ""), what


async def test_an_expired_token_is_refused_naming_its_service(ca, server):
    token = _token(ca, ttl=dt.timedelta(seconds=1))
    await asyncio.sleep(1.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await certify(server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "worker expired" in (caught.value.details() or "")


async def test_a_bad_csr_is_invalid_argument(ca, server):
    request = pb.CertifyRequest(csr_pem=b"not a csr", token=_token(ca))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _raw_certify(server, ca, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_oversize_request_is_refused_and_the_server_keeps_serving(ca, server):
    request = pb.CertifyRequest(csr_pem=b"x" * (1 << 20), token=_token(ca))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _raw_certify(server, ca, request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    got = await certify(server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=_token(ca))
    assert got.identity.name == "worker"


async def test_the_server_proves_it_is_the_identity_server_of_this_mesh(ca, server, tmp_path):
    served = server.credentials().leaf
    assert spiffe_id_of(served) == SpiffeId(TD, "identity")
    # A client of another mesh (another bundle) cannot be fooled into talking to it.
    foreign = init_ca(tmp_path / "other", TD)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await certify(
            server.address, bundle_pem=foreign.bundle_pem, trust_domain=TD, token=_token(ca)
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_gets_a_clear_failure_not_an_answer(ca, server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.IdentityStub(channel).Certify(pb.CertifyRequest(), timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_renewal_comes_at_about_seventy_percent_of_the_life_left(ca):
    key, _ = new_request()
    leaf = ca.issue(key.public_key(), SpiffeId.service(TD, "w"), dt.timedelta(seconds=100))
    delays = [renew_after(leaf.cert) for _ in range(200)]
    assert all(58 <= d <= 81 for d in delays)
    # Jitter: the workloads certified together do not all come back together.
    assert max(delays) - min(delays) > 5
    assert isinstance(Credentials(key, leaf.cert_pem, ca.bundle_pem).identity, SpiffeId)


async def test_a_registry_token_gets_the_registry_identity_and_nothing_else(ca, server):
    token, claims = create_token(ca, SpiffeId(TD, "registry"), dt.timedelta(minutes=1))
    assert claims.identity == SpiffeId(TD, "registry")
    got = await certify(server.address, bundle_pem=ca.bundle_pem, trust_domain=TD, token=token)
    assert str(got.identity) == "spiffe://shoal.local/registry"
