"""Raw HTTP/2 peers for tests, built on h2 (hyper-h2) over a socket: a plain client
(``RawH2``) for what grpcio will not send, and misbehaving ones for the limit tests
(``RapidReset``, ``NonReader``).

All are blocking: run them in a thread (``asyncio.to_thread``) from async tests. The
misbehaving ones are bounded in streams and in time.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, RstStreamFrame, SettingsFrame

REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM


def _config() -> h2.config.H2Configuration:
    # Skip h2's header checks on the way out: an attacker spends nothing it need not.
    return h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        split_outbound_cookies=False,
    )


def _grpc_headers(port: int, path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message frame."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class Inbound:
    """What the server sent, frame by frame (h2 hides frames for streams we reset)."""

    goaway: GoAwayFrame | None = None
    refused: int = 0
    pings: int = 0
    closed: bool = False
    settings_to_ack: int = 0
    _buffer: bytes = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            if isinstance(frame, GoAwayFrame) and self.goaway is None:
                self.goaway = frame
            elif isinstance(frame, RstStreamFrame) and frame.error_code == REFUSED_STREAM:
                self.refused += 1
            elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                self.pings += 1
            elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.settings_to_ack += 1


def _pump(
    sock: socket.socket, conn: h2.connection.H2Connection, seen: Inbound, answer_pings: bool
) -> None:
    """Take what the server sent so far; h2 answers its PINGs and SETTINGS for us.

    Without ``answer_pings`` h2 never sees the server's frames: only SETTINGS are
    acknowledged (by hand), so the server's PINGs go unanswered.
    """
    while not seen.closed:
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            seen.closed = True
            return
        if not data:
            seen.closed = True
            return
        seen.feed(data)
        if answer_pings:
            try:
                conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                pass  # frames for streams we reset; the frame log above has what matters
        acks = b""
        if not answer_pings:
            acks = SettingsFrame(0, flags=["ACK"]).serialize() * seen.settings_to_ack
            seen.settings_to_ack = 0
        _send(sock, conn, seen, acks)


def _send(
    sock: socket.socket, conn: h2.connection.H2Connection, seen: Inbound, extra: bytes = b""
) -> None:
    out = conn.data_to_send() + extra
    if not out or seen.closed:
        return
    sock.setblocking(True)
    try:
        sock.sendall(out)
    except OSError:
        seen.closed = True
    finally:
        sock.setblocking(False)


@dataclass
class RapidReset:
    """Open streams with HEADERS and reset each at once (CVE-2023-44487), in a tight loop.

    Runs until the server sends GOAWAY or closes the connection, or until
    ``max_streams`` or ``seconds`` run out. With ``max_streams=0`` it is an idle peer
    that only waits for the server to send it away.
    """

    port: int
    path: str
    max_streams: int
    seconds: float
    answer_pings: bool = True
    streams: int = 0
    seen: Inbound = field(default_factory=Inbound)

    def run(self) -> RapidReset:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h2.connection.H2Connection(_config())
        conn.initiate_connection()
        _send(sock, conn, self.seen)
        sock.setblocking(False)
        headers = _grpc_headers(self.port, self.path)
        deadline = time.monotonic() + self.seconds
        try:
            while (
                self.seen.goaway is None
                and not self.seen.closed
                and self.streams < self.max_streams
                and time.monotonic() < deadline
                # One that ignores PINGs stops sending once asked: a server that ends a
                # connection with our frames unread resets it, and the kernel then drops
                # the GOAWAY that says why before we can read it.
                and (self.answer_pings or self.seen.pings == 0)
            ):
                for _ in range(100):
                    stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(stream_id, headers)
                    conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                self.streams += 100
                _send(sock, conn, self.seen)
                _pump(sock, conn, self.seen, self.answer_pings)
            # With no streams to send, stay until the server says or does something.
            while self.seen.goaway is None and not self.seen.closed:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
                _pump(sock, conn, self.seen, self.answer_pings)
        finally:
            sock.close()
        return self


def grpc_message(payload: bytes) -> bytes:
    """A length-prefixed gRPC message holding ``payload`` as field 1 (bytes)."""
    size, varint = len(payload), b""
    while True:
        byte, size = size & 0x7F, size >> 7
        varint += bytes([byte | (0x80 if size else 0)])
        if not size:
            break
    body = b"\x0a" + varint + payload
    return b"\x00" + struct.pack(">I", len(body)) + body


@dataclass
class NonReader:
    """Sends ``calls`` requests of ``payload`` but advertises a receive window of 0.

    The server can take the requests but never send a reply's DATA; call ``vanish``
    to reset the TCP connection, as a client that went away does.
    """

    port: int
    path: str
    calls: int
    payload: bytes
    answered: set[int] = field(default_factory=set)
    # Streams the server reset: REFUSED_STREAM, or ENHANCE_YOUR_CALM for those opened
    # before our SETTINGS ACK reached it (this client opens them all at once).
    refused: set[int] = field(default_factory=set)
    seen: Inbound = field(default_factory=Inbound)

    def __post_init__(self) -> None:
        self._sock = socket.create_connection(("127.0.0.1", self.port))
        conn = h2.connection.H2Connection(_config())
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._conn = conn

    def send_all(self, seconds: float) -> NonReader:
        """Open every call and send its request whole, as far as the server lets us."""
        conn, sock = self._conn, self._sock
        conn.initiate_connection()
        _send(sock, conn, self.seen)
        message = grpc_message(self.payload)
        left: dict[int, memoryview] = {}
        for _ in range(self.calls):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, _grpc_headers(self.port, self.path))
            left[stream_id] = memoryview(message)
        sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while left and not self.seen.closed and time.monotonic() < deadline:
            for stream_id, rest in list(left.items()):
                if stream_id in self.refused:
                    del left[stream_id]
                    continue
                room = min(len(rest), conn.local_flow_control_window(stream_id))
                while room > 0:
                    chunk = min(room, conn.max_outbound_frame_size)
                    conn.send_data(stream_id, rest[:chunk].tobytes())
                    rest, room = rest[chunk:], room - chunk
                if rest:
                    left[stream_id] = rest
                else:
                    conn.end_stream(stream_id)
                    del left[stream_id]
            _send(sock, conn, self.seen)
            time.sleep(0.01)
            self._take()
        return self

    def hold(self, seconds: float) -> None:
        """Stay connected (answering PINGs, reading nothing) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.seen.closed:
            time.sleep(0.05)
            self._take()

    def _take(self) -> None:
        try:
            data = self._sock.recv(1 << 16)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            self.seen.closed = True
            return
        if not data:
            self.seen.closed = True
            return
        self.seen.feed(data)
        for event in self._conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.answered.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.refused.add(event.stream_id)
        _send(self._sock, self._conn, self.seen)

    def vanish(self) -> None:
        """Reset the TCP connection: the kernel sends a RST, nothing more is said."""
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()


class RawH2:
    """One client connection; ``events`` collects everything the server sent."""

    def __init__(self, address: str, *, timeout: float = 10.0, handshake: bool = True) -> None:
        host, _, port = address.rpartition(":")
        self.port = int(port)
        self.sock = socket.create_connection((host, self.port), timeout=timeout)
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
        headers = [*_grpc_headers(self.port, path), *metadata]
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
