"""New mTLS connections a second on the mesh hop: handshake, HTTP/2 preface, close.

Each connection is fresh (no session resumption: the client never offers a session,
and neither server keeps any), shows the client's leaf, checks the server's against the
bundle and its name, and counts once the server's HTTP/2 SETTINGS frame arrives: a
TLS 1.3 server sends it only after the client's Finished, so the server has verified
the client's certificate by then. Then the client closes. Blocking sockets in threads:
OpenSSL lets go of the GIL for the handshake's work, so the threads' handshakes overlap.

CPU is the server side's (the worker sidecar, the second nginx's master + worker) over a
fixed number of connections, divided by them; the client's own CPU (this process) is
reported beside it, since on a small machine the client can be what limits the rate.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .tlsstacks import ClientFiles, TlsPort

__all__ = ["HandshakeRun", "client_context", "handshakes"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS = 0x4
TIMEOUT = 5.0


@dataclass(frozen=True)
class HandshakeRun:
    """One round against one listener: connections completed and what they cost."""

    done: int
    failed: int
    seconds: float
    server_cpu: float
    client_cpu: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def server_us(self) -> float | None:
        return self.server_cpu / self.done * 1e6 if self.done else None

    @property
    def client_us(self) -> float | None:
        return self.client_cpu / self.done * 1e6 if self.done else None

    @property
    def server_busy(self) -> float:
        """The share of one core the server spent over the round."""
        return self.server_cpu / self.seconds if self.seconds else 0.0


def client_context(files: ClientFiles) -> ssl.SSLContext:
    """TLS 1.3, ALPN h2, the client's leaf shown, the server's checked (name included)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(files.bundle))
    ctx.load_cert_chain(str(files.chain), str(files.key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _read(tls: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed before the server's SETTINGS")
        data += chunk
    return data


def _connect(ctx: ssl.SSLContext, host: str, port: int, name: str) -> None:
    """One connection, up to the server's first SETTINGS frame; raises if it fails."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            if tls.selected_alpn_protocol() != "h2":
                raise ConnectionError(f"ALPN {tls.selected_alpn_protocol()!r}, not h2")
            tls.sendall(PREFACE + EMPTY_SETTINGS)
            header = _read(tls, 9)
            if header[3] != SETTINGS:
                raise ConnectionError(f"first frame of type {header[3]}, not SETTINGS")


def _loop(ctx: ssl.SSLContext, port: TlsPort, count: int, errors: list[str]) -> int:
    host, _, number = port.address.rpartition(":")
    done = 0
    for _ in range(count):
        try:
            _connect(ctx, host, int(number), port.server_name)
            done += 1
        except (OSError, ConnectionError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return done


async def handshakes(
    ctx: ssl.SSLContext, port: TlsPort, count: int, threads: int, *, measured: bool = True
) -> HandshakeRun:
    """``count`` new connections to ``port`` over ``threads`` threads, timed and costed."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    before = port.meter.usage() if measured else None
    client_before = time.process_time()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="handshake") as pool:
        done = sum(
            await asyncio.gather(
                *(loop.run_in_executor(pool, _loop, ctx, port, n, errors) for n in share)
            )
        )
    seconds = time.perf_counter() - start
    client_cpu = time.process_time() - client_before
    server_cpu = (port.meter.usage() - before).cpu if before is not None else 0.0
    note = f"{len(errors)} failed, e.g. {errors[0]}" if errors else ""
    return HandshakeRun(done, count - done, seconds, server_cpu, client_cpu, note)
