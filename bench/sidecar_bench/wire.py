"""What the bench sends: Echo and CallStream messages, as gRPC frames for h2load."""

from __future__ import annotations

from protos import worker_pb2

__all__ = ["CALL_STREAM", "ECHO", "SERVICE", "echo_message", "grpc_frame"]

SERVICE = "shoal.worker.v1.Worker"
ECHO = f"/{SERVICE}/Echo"
CALL_STREAM = f"/{SERVICE}/CallStream"


def echo_message(size: int) -> bytes:
    """An EchoRequest of ``size`` payload bytes; the EchoReply has the same bytes."""
    # EchoReply has the same field as EchoRequest, so the reply's bytes equal the request's.
    return worker_pb2.EchoRequest(payload=b"x" * size).SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC message frame: no compression, 4-byte length, then the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message
