"""The pages server: real sockets on 127.0.0.1:0 against what an outsider can do to it."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import psutil
import pytest

from shoal_core.grpc_server import ServerStartError
from shoal_core.http import HttpServer, Page

BODY = b"hello pages\n"


def _hello() -> Page:
    return 200, "text/plain", BODY


def _broken() -> Page:
    raise RuntimeError("a page bug")


PAGES = {"/hello": _hello, "/broken": _broken}

StartServer = Callable[..., Awaitable[HttpServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[HttpServer] = []

    async def start(**settings: Any) -> HttpServer:
        pages = settings.pop("pages", PAGES)
        server = HttpServer("127.0.0.1:0", pages, **settings)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll until ``condition`` holds; the deadline only bounds a failing test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def ended_by_server(reader: asyncio.StreamReader, timeout: float = 20.0) -> bytes | None:
    """What the server sent before it closed the connection; None if it never closed it."""
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return received
    except TimeoutError:
        return None
    return received


async def request(
    port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a fresh connection, parsed by h11's client side."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        client = h11.Connection(h11.CLIENT)
        return await _exchange(client, reader, writer, method, target, headers or [])
    finally:
        writer.close()


async def _exchange(
    client: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
) -> tuple[int, dict[bytes, bytes], bytes]:
    head = h11.Request(method=method, target=target, headers=[("Host", "t"), *headers])
    writer.write(client.send(head))
    writer.write(client.send(h11.EndOfMessage()))
    status, found, body = 0, {}, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            status, found = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, found, body


def _reset(sock: socket.socket) -> None:
    """Close so that the kernel sends a RST: a client that vanished mid-conversation."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_silent_connections_hold_no_thread_and_are_closed_after_the_head_timeout(
    start_server: StartServer,
) -> None:
    # Long enough for all 500 to be open at once on a loaded machine, short for a test.
    server = await start_server(head_timeout=3.0, max_connections=1000)
    me = psutil.Process()
    threads = me.num_threads()
    clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(500)]
    try:
        await wait_for(lambda: server.connections == 500, what="500 connections accepted")
        # A thread per connection would show 500 more here.
        assert me.num_threads() <= threads + 2
        ends = await asyncio.gather(*(ended_by_server(reader) for reader, _ in clients))
        assert all(end == b"" for end in ends), "every silent connection is closed, unanswered"
        assert server.connections == 0
    finally:
        for _, writer in clients:
            writer.close()


async def test_a_client_that_resets_mid_request_is_one_debug_line_and_no_traceback(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start_server()
    loop = asyncio.get_running_loop()
    for sent in (b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Half: ", b"GET /hello HTTP/1.1\r\n\r\n"):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        await wait_for(lambda: server.connections == 1, what="the connection accepted")
        await loop.sock_sendall(sock, sent)
        _reset(sock)
        await wait_for(lambda: server.connections == 0, what="the reset connection forgotten")
    assert (await request(server.port, "GET", "/hello"))[0] == 200
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"
    assert "Traceback" not in caplog.text + capfd.readouterr().err
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert gone and all(r.levelno == logging.DEBUG and "\n" not in r.getMessage() for r in gone)


async def test_past_the_cap_a_new_connection_is_closed_at_once_and_served_once_others_leave(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections=3, head_timeout=60.0)
    holders = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    await wait_for(lambda: server.connections == 3, what="three connections held")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await ended_by_server(reader) == b"", "the fourth is closed before a byte"
    writer.close()
    assert server.rejected == 1 and server.connections == 3
    holders[0][1].close()
    await wait_for(lambda: server.connections == 2, what="a holder gone")
    assert await request(server.port, "GET", "/hello") == (200, _headers_of(server), BODY)
    for _, held in holders[1:]:
        held.close()


def _headers_of(server: HttpServer) -> dict[bytes, bytes]:
    return {
        b"content-type": b"text/plain",
        b"content-length": str(len(BODY)).encode(),
        b"cache-control": b"no-store",
    }


async def test_a_burst_of_connects_waits_in_the_listen_backlog_and_all_are_served(
    start_server: StartServer,
) -> None:
    burst = 300
    server = await start_server(max_connections=burst + 10)
    # This block never yields, so nothing accepts: the kernel's listen backlog alone must
    # hold the whole burst (a backlog of 5 completes 6 handshakes, then drops SYNs).
    socks = []
    for _ in range(burst):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", server.port))
        socks.append(sock)
    waiting, deadline = set(socks), time.monotonic() + 5.0
    while waiting and time.monotonic() < deadline:
        _, done, _ = select.select([], list(waiting), [], 0.1)
        waiting -= set(done)
    failed = [s for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)]
    assert (len(waiting), len(failed)) == (0, 0), "every connect of the burst completes"
    served = 0
    for sock in socks:
        reader, writer = await asyncio.open_connection(sock=sock)
        client = h11.Connection(h11.CLIENT)
        status, _, body = await _exchange(client, reader, writer, "GET", "/hello", [])
        served += status == 200 and body == BODY
        writer.close()
    assert served == burst


async def test_an_oversize_or_garbled_request_head_is_refused_and_the_connection_closed(
    start_server: StartServer,
) -> None:
    server = await start_server(max_head_bytes=4096)
    for sent, status in (
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n", b"431"),
        (b"GET /" + b"p" * 8000 + b" HTTP/1.1\r\n", b"431"),
        (b"\x00\x01\x02 garbage\r\n\r\n", b"400"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(sent)
        reply = await ended_by_server(reader)
        assert reply is not None and reply.startswith(b"HTTP/1.1 " + status), reply
        assert b"connection: close" in reply.lower()
        writer.close()
    assert (await request(server.port, "GET", "/hello"))[0] == 200


async def test_only_get_and_head_without_a_body_are_served(start_server: StartServer) -> None:
    server = await start_server()
    status, headers, body = await request(server.port, "HEAD", "/hello")
    assert (status, headers[b"content-length"], body) == (200, str(len(BODY)).encode(), b"")
    assert (await request(server.port, "GET", "/hello?refresh=1"))[::2] == (200, BODY)
    for sent, code in (
        (b"POST /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi", b"405"),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi", b"413"),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n", b"413"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(sent)
        reply = await ended_by_server(reader)
        assert reply is not None and reply.startswith(b"HTTP/1.1 " + code), reply
        if code == b"405":
            assert b"\r\nAllow: GET, HEAD\r\n" in reply
        writer.close()
    status, _, body = await request(server.port, "GET", "/nothing-here")
    assert status == 404 and b"/hello" in body


async def test_a_kept_alive_connection_serves_in_turn_then_idles_out(
    start_server: StartServer,
) -> None:
    server = await start_server(idle_timeout=2.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    client = h11.Connection(h11.CLIENT)
    for _ in range(3):
        assert (await _exchange(client, reader, writer, "GET", "/hello", []))[0] == 200
        client.start_next_cycle()
    assert server.connections == 1
    assert await ended_by_server(reader) == b""
    assert server.connections == 0
    writer.close()


async def test_a_reply_the_client_does_not_read_is_given_up_after_the_write_timeout(
    start_server: StartServer,
) -> None:
    big = b"x" * (32 * 1024 * 1024)
    server = await start_server(write_timeout=0.3, pages={"/big": lambda: (200, "text/plain", big)})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    sock.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    await wait_for(lambda: server.connections == 1, what="the request taken")
    # Never read: the server must let go of the connection and of its 32 MiB reply.
    await wait_for(lambda: server.connections == 0, what="the stalled reply given up")
    sock.close()


async def test_a_failing_page_answers_500_and_the_server_goes_on(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    assert (await request(server.port, "GET", "/broken"))[0] == 500
    assert (await request(server.port, "GET", "/hello"))[0] == 200
    assert any("/broken failed" in r.getMessage() for r in caplog.records)


async def test_close_ends_every_connection_and_leaves_no_task_behind() -> None:
    tasks = asyncio.all_tasks()
    server = HttpServer("127.0.0.1:0", PAGES)
    await server.start()
    port = server.port
    idle = await asyncio.open_connection("127.0.0.1", port)
    half = await asyncio.open_connection("127.0.0.1", port)
    half[1].write(b"GET /hello HTTP/1.1\r\n")
    kept = await asyncio.open_connection("127.0.0.1", port)
    assert (await _exchange(h11.Connection(h11.CLIENT), *kept, "GET", "/hello", []))[0] == 200
    await wait_for(lambda: server.connections == 3, what="three connections")
    await server.close()
    assert server.connections == 0
    for reader, writer in (idle, half, kept):
        assert await ended_by_server(reader, timeout=5.0) is not None
        writer.close()
    assert asyncio.all_tasks() == tasks
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_taken_port_is_one_clear_error(start_server: StartServer) -> None:
    first = await start_server()
    second = HttpServer(f"127.0.0.1:{first.port}", PAGES)
    with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{first.port}: address"):
        await second.start()
