"""Certify over gRPC: proto in, ``Certifier`` decides, proto out."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from identity.certify import (
    BadRequest,
    Certifier,
    CertifyError,
    NotProven,
    Renewal,
    spiffe_id_of,
)
from protos import identity_pb2 as pb
from protos import identity_pb2_grpc as pb_grpc
from shoal_core.codes import ErrorCodes
from shoal_core.servicing import maps_errors

__all__ = ["CODES", "IdentityServicer"]

logger = logging.getLogger(__name__)

CODES = ErrorCodes[grpc.StatusCode](
    {NotProven: grpc.StatusCode.UNAUTHENTICATED, BadRequest: grpc.StatusCode.INVALID_ARGUMENT},
    default=grpc.StatusCode.INVALID_ARGUMENT,
)


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, certifier: Certifier) -> None:
        self.certifier = certifier
        # For /metrics: leaves issued by (identity kind, proof), refusals by (proof, code).
        self.issued: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}

    @maps_errors(CertifyError, CODES)
    async def Certify(  # noqa: N802 - the proto's name
        self, request: pb.CertifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CertifyResponse:
        renewal = (
            Renewal(request.renewal.certificate_pem, request.renewal.signature)
            if request.HasField("renewal")
            else None
        )
        proof = "renewal" if renewal is not None else "token"
        try:
            leaf = self.certifier.certify(request.csr_pem, token=request.token, renewal=renewal)
        except CertifyError as exc:
            # Who was refused and why, never the token: the log is not a secret store.
            logger.warning("certify from %s refused: %s", context.peer(), exc)
            key = (proof, CODES(exc).name)
            self.refused[key] = self.refused.get(key, 0) + 1
            raise
        who = spiffe_id_of(leaf.cert)
        self.issued[(who.kind, proof)] = self.issued.get((who.kind, proof), 0) + 1
        logger.info(
            "certified %s until %s", who, f"{leaf.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
        )
        return pb.CertifyResponse(
            certificate_chain_pem=leaf.cert_pem + leaf.chain_pem,
            trust_bundle_pem=self.certifier.ca.bundle_pem,
            spiffe_id=str(who),
            expires_unix_ms=int(leaf.cert.not_valid_after_utc.timestamp() * 1000),
        )
