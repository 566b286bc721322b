"""`DashboardServer` and `shoal dashboard` against a real registry: what an outsider meets.

The page and its headers, the host check, the bound on open event streams (and a
slot given back when a stream ends), a close that ends open streams at once, and the
command's one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator

import httpx
import pytest

from shoal_cli.dashboard.server import DashboardServer
from shoal_core.errors import ServerStartError
from tests.shoal_cli.conftest import SHOAL

Registry = tuple[subprocess.Popen[str], str]


@pytest.fixture
async def dashboard(registry_process: Registry) -> AsyncIterator[DashboardServer]:
    server = DashboardServer("127.0.0.1:0", registry_process[1])
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace=1)
        await server.wait_closed()


async def next_frame(lines: AsyncIterator[str]) -> dict[str, object]:
    """The next snapshot from a stream's lines. One iterator per stream, kept while it is
    open: httpx closes a stream whose line iterator is dropped."""
    async for line in lines:
        if line.startswith("data: "):
            found: dict[str, object] = json.loads(line.removeprefix("data: "))
            return found
    raise AssertionError("the stream ended before a snapshot")


async def test_the_page_is_served_with_a_strict_content_policy(dashboard: DashboardServer) -> None:
    async with httpx.AsyncClient(base_url=dashboard.url, trust_env=False) as client:
        page = await client.get("/")
        assert page.status_code == 200 and "<title>Shoal mesh</title>" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        for name in ("app.js", "dom.js", "traces.js"):
            script = await client.get(f"/{name}")
            assert script.headers["content-type"].startswith("text/javascript")
            assert "innerHTML" not in script.text  # mesh data is set as text only
        assert (await client.post("/api/snapshot")).status_code == 405


async def test_a_host_name_other_than_loopback_is_refused(dashboard: DashboardServer) -> None:
    # What DNS rebinding would send: a page elsewhere, under a name that now points here.
    async with httpx.AsyncClient(base_url=dashboard.url, trust_env=False) as client:
        refused = await client.get("/api/snapshot", headers={"Host": "attacker.example"})
        assert refused.status_code == 400
        assert (await client.get("/api/snapshot", headers={"Host": "localhost"})).is_success


async def test_the_snapshot_follows_the_registry(dashboard: DashboardServer) -> None:
    async with httpx.AsyncClient(base_url=dashboard.url, trust_env=False) as client:
        for _ in range(100):
            snap = (await client.get("/api/snapshot")).json()
            if snap["registry"]["connected"]:
                break
            await asyncio.sleep(0.05)
    assert snap["registry"]["connected"] and snap["services"] == []
    assert snap["traces"] is None  # no --otlp-listen: the page says tracing is off
    assert [e["kind"] for e in snap["events"]] == ["snapshot"]


async def test_event_streams_are_bounded_and_a_closed_one_gives_its_place_back(
    dashboard: DashboardServer,
) -> None:
    dashboard.hub.max_streams = 2
    async with httpx.AsyncClient(base_url=dashboard.url, trust_env=False, timeout=10) as client:
        async with client.stream("GET", "/events") as one:
            assert one.headers["content-type"].startswith("text/event-stream")
            one_lines = one.aiter_lines()
            assert "registry" in await next_frame(one_lines)
            async with client.stream("GET", "/events") as two:
                await next_frame(two.aiter_lines())
                assert dashboard.hub.streams == 2
                async with client.stream("GET", "/events") as refused:
                    assert refused.status_code == 503
                    assert "at most 2" in (await refused.aread()).decode()
            for _ in range(100):  # the server sees the client leave within a tick
                if dashboard.hub.streams == 1:
                    break
                await asyncio.sleep(0.05)
            assert dashboard.hub.streams == 1
            async with client.stream("GET", "/events") as again:
                await next_frame(again.aiter_lines())
            await next_frame(one_lines)  # the first stream went on all along


async def test_close_ends_open_streams_rather_than_waiting_out_the_grace(
    registry_process: Registry,
) -> None:
    server = DashboardServer("127.0.0.1:0", registry_process[1])
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        async with client.stream("GET", "/events") as stream:
            lines = stream.aiter_lines()
            await next_frame(lines)
            # A stream never ends by itself: a close that only waited would take the grace.
            async with asyncio.timeout(20):
                await server.close(grace=60)
                await server.wait_closed()
                async for _ in lines:
                    pass  # to its end: the server closed it
    assert server.hub.streams == 0


async def test_a_taken_port_is_one_clear_error(registry_process: Registry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = DashboardServer(f"127.0.0.1:{port}", registry_process[1])
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port}: "):
            await server.start()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "nowhere"], "--listen"),
        (["--scrape", "127.0.0.1"], "--scrape"),
        (["--registry", "x:y"], "--registry"),
        (["--otlp-listen", "nowhere"], "--otlp-listen"),
    ],
)
def test_bad_dashboard_flags_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*SHOAL, "dashboard", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and message in lines[0]
