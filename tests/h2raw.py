"""A raw HTTP/2 client for tests that must say what grpcio will not (hyper-h2 on a socket).

Blocking: run it with ``asyncio.to_thread`` from async tests, so the servers on the
test's event loop keep running.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

__all__ = ["RawH2", "grpc_frame"]


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message frame."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class RawH2:
    """One client connection; ``events`` collects everything the server sent."""

    def __init__(self, address: str, *, timeout: float = 10.0, handshake: bool = True) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []
        self.closed = False
        self.terminated = False
        if handshake:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False once the server closed the socket."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        if self.terminated:
            return True  # after GOAWAY: only the socket's end is still news
        if any(isinstance(e, h2.events.ConnectionTerminated) for e in self.events):
            self.terminated = True
            return True
        try:
            self.events += self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            # hyper-h2 takes a GOAWAY as the end and refuses the frames a server still
            # sends after it (such as a graceful shutdown's PING): the GOAWAY came.
            self.terminated = True
        self.flush()
        return True

    def wait(self, done: type[h2.events.Event] | None, timeout: float) -> bool:
        """Read until an event of type ``done`` (None: the socket closing), or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done is not None and any(isinstance(e, done) for e in self.events):
                return True
            if done is h2.events.ConnectionTerminated and self.terminated:
                return True
            if not self.pump(min(0.2, max(0.01, deadline - time.monotonic()))):
                return done is None
        return False

    def settings(self, timeout: float = 5.0) -> dict[int, int]:
        """The server's SETTINGS."""
        assert self.wait(h2.events.RemoteSettingsChanged, timeout), self.events
        changed = next(e for e in self.events if isinstance(e, h2.events.RemoteSettingsChanged))
        return {int(k): v.new_value for k, v in changed.changed_settings.items()}

    def call(
        self,
        path: str,
        message: bytes = b"",
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float = 10.0,
    ) -> dict[str, str]:
        """A unary gRPC call; the response's headers and trailers merged (last wins)."""
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "shoal.test"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.conn.send_headers(stream, headers)
        self.conn.send_data(stream, grpc_frame(message), end_stream=True)
        self.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = [
                e
                for e in self.events
                if isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
                and e.stream_id == stream
            ]
            if ended:
                break
            if not self.pump(0.2):
                break
        found: dict[str, str] = {}
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                if event.stream_id == stream:
                    found.update((str(k), str(v)) for k, v in event.headers)
        return found

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
