"""``shoal health``: a grpc.health.v1 probe, for scripts and container health checks.

Container health checks run it every few seconds in every container, so it must cost
next to nothing: it makes its one call with hyper-h2 over a plain socket instead of
starting grpcio's runtime, which costs about half a second of CPU before the first
byte is sent (tens of milliseconds, this way).
"""

from __future__ import annotations

import socket
import time

import click
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from shoal_cli.errors import UserError
from shoal_cli.options import ADDRESS, json_option
from shoal_cli.output import emit_json, say
from shoal_core.addresses import parse_address
from shoal_core.codes import code_name

__all__ = ["check", "health"]

_PATH = "/grpc.health.v1.Health/Check"
_NOT_FOUND = 5
# A health reply is a few bytes; a peer that sends more is not a health service.
_MAX_REPLY = 64 * 1024


class _Unreachable(Exception):
    """No answer: the reason, in a few words."""


def _call(address: str, request: bytes, timeout: float) -> tuple[dict[str, str], bytes]:
    """One unary gRPC call on a fresh connection: the response's headers and trailers
    merged, and its body."""
    target = parse_address(address)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError as exc:
        raise _Unreachable(exc.strerror or str(exc)) from None
    with sock:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", _PATH),
                (":authority", str(target)),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", f"{max(1, round(timeout * 1000))}m"),
            ],
        )
        conn.send_data(stream, b"\0" + len(request).to_bytes(4, "big") + request, end_stream=True)
        headers: dict[str, str] = {}
        body = b""
        try:
            sock.sendall(conn.data_to_send())
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Unreachable("no answer in time")
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    raise _Unreachable("the connection closed")
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        headers.update((str(k), str(v)) for k, v in event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream)
                        if len(body) > _MAX_REPLY:
                            raise _Unreachable("the reply is too large for a health check")
                    elif isinstance(event, h2.events.StreamEnded):
                        return headers, body
                    elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                        raise _Unreachable("the call was reset")
                sock.sendall(conn.data_to_send())
        except TimeoutError:
            raise _Unreachable("no answer in time") from None
        except h2.exceptions.ProtocolError:
            raise _Unreachable("it does not speak HTTP/2") from None
        except OSError as exc:
            raise _Unreachable(exc.strerror or str(exc)) from None


def check(address: str, service: str, timeout: float) -> str:
    """The serving status ``address`` reports for ``service`` ("" for the server)."""
    request = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    try:
        headers, body = _call(address, request, timeout)
    except _Unreachable as exc:
        raise UserError(f"{address} is unreachable ({exc})") from None
    status = headers.get("grpc-status", "")
    code = int(status) if status.isdigit() else 2
    if code == _NOT_FOUND:
        raise UserError(f"{address} does not know service {service!r}")
    if code != 0:
        raise UserError(f"{address} is unreachable ({code_name(code)})")
    size = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + size or body[:1] != b"\0":
        raise UserError(f"{address} sent a health reply that is not one plain message")
    try:
        reply = health_pb2.HealthCheckResponse.FromString(body[5:])
    except DecodeError:
        raise UserError(f"{address} sent a health reply that does not decode") from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@click.command()
@click.argument("address", type=ADDRESS)
@click.option("--service", default="", help="Service name to check; empty checks the server.")
@click.option(
    "--timeout", type=click.FloatRange(min=0.0, min_open=True), default=3.0, show_default=True
)
@json_option()
def health(address: str, service: str, timeout: float, as_json: bool) -> int:
    """Check ADDRESS with grpc.health.v1; exit 0 when SERVING, 1 otherwise."""
    status = check(address, service, timeout)
    if as_json:
        emit_json({"address": address, "service": service, "status": status})
    else:
        say(status)
    return 0 if status == "SERVING" else 1
