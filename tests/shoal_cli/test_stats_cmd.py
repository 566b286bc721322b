"""`shoal stats` pointed at the wrong thing: one line naming it, exit 2."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.shoal_cli.conftest import SHOAL

Registry = tuple[subprocess.Popen[str], str]


@pytest.fixture
def plain_http() -> Iterator[str]:
    """An HTTP server that is not a sidecar's admin page: 404 for everything."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def stats(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, "stats", *args], capture_output=True, text=True, timeout=30)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), result.stderr
    return lines[0]


def test_a_grpc_port_as_sidecar_admin_is_one_line(registry_process: Registry) -> None:
    _, address = registry_process
    line = one_error_line(stats("--registry", address, "--sidecar-admin", address))
    assert line == (
        f"shoal: error: --sidecar-admin {address} is not a sidecar's admin address: "
        "it does not answer HTTP/1.1 (a gRPC port?)"
    )


def test_an_http_server_that_is_no_sidecar_is_one_line(
    registry_process: Registry, plain_http: str
) -> None:
    _, address = registry_process
    line = one_error_line(stats("--registry", address, "--sidecar-admin", plain_http))
    assert line == (
        f"shoal: error: --sidecar-admin {plain_http} is not a sidecar's admin address: "
        "GET /endpoints answered HTTP 501"
    )


def test_unreachable_sidecar_admin_and_a_worker_that_is_none(registry_process: Registry) -> None:
    _, address = registry_process
    line = one_error_line(stats("--registry", address, "--sidecar-admin", "127.0.0.1:1"))
    assert line == "shoal: error: --sidecar-admin 127.0.0.1:1 is unreachable (Connection refused)"
    line = one_error_line(stats("--registry", address, "--worker", address))
    assert line == (
        f"shoal: error: --worker {address} is not a worker (UNIMPLEMENTED: Method not found!)"
    )
