"""The dashboard in a real headless browser, against a mesh `shoal up` runs.

Debian's chromium, driven through chromedriver by selenium: the page shows the
workers, its figures move while Echo load runs through the client sidecar, a trace of
those calls is listed and, clicked, shows its waterfall across the hops, which stays
open through live updates; and the instance whose worker is killed turns unhealthy,
with no reload. Leases of 3 s (heartbeats each second) keep that quick; `--restart
never` keeps the worker dead; `--trace-sample 1` has every call traced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from tests.shoal_cli.test_up import alive, start_mesh, stop_mesh

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium or chromedriver is missing: install them with 'apt-get install "
    "chromium chromium-driver' (Debian), or scripts/test does it as root",
)
# Rows as the page marks them; read in one script, so a row updated meanwhile is no
# stale element.
ROWS = """return Array.from(document.querySelectorAll('tr[data-instance-id]'))
    .map(r => [r.dataset.instanceId, r.dataset.health, r.dataset.status]);"""
SERVICE_RPS = """const cell = document.querySelector('tr[data-service-total="worker"] td.rps');
    return cell ? cell.textContent : null;"""
EDGES = """return Array.from(document.querySelectorAll('#edges tbody tr'))
    .map(r => Array.from(r.cells).slice(0, 3).map(c => c.textContent));"""
TRACES = """return Array.from(document.querySelectorAll('#traces tbody tr[data-trace-id]'))
    .map(r => [r.dataset.traceId, r.querySelector('td.services').textContent]);"""
WATERFALL = """const box = document.getElementById('waterfall');
    if (box.hidden) return null;
    return [box.dataset.traceId, Array.from(box.querySelectorAll('li[data-span-id]'))
        .map(li => [li.dataset.service, li.querySelector('.span-bar').style.width])];"""


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def echo_load(via: str, seconds: float = 60.0, most: int = 200_000) -> Iterator[None]:
    """Echo calls one after another through ``via``, in a thread, until the block ends
    (or ``seconds`` pass, or ``most`` calls were made)."""
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + seconds
        with grpc.insecure_channel(via) as channel:
            stub = wpb_grpc.WorkerStub(channel)
            for _ in range(most):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    stub.Echo(wpb.EchoRequest(payload=b"dashboard"), timeout=5)
                except grpc.RpcError:
                    time.sleep(0.05)  # no hot loop while the mesh has no answer

    thread = threading.Thread(target=run, name="echo-load")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)


def rows(driver: WebDriver) -> list[list[str]]:
    found: list[list[str]] = driver.execute_script(ROWS)
    return found


def rps(driver: WebDriver) -> float | None:
    text: str | None = driver.execute_script(SERVICE_RPS)
    return float(text) if text else None


def edges(driver: WebDriver) -> list[list[str]]:
    found: list[list[str]] = driver.execute_script(EDGES)
    return found


def traces(driver: WebDriver) -> list[list[str]]:
    found: list[list[str]] = driver.execute_script(TRACES)
    return found


def waterfall(driver: WebDriver) -> tuple[str, list[list[str]]] | None:
    """The open waterfall's trace id and its spans' (service, bar width); None: closed."""
    found: list[Any] | None = driver.execute_script(WATERFALL)
    return None if found is None else (found[0], found[1])


def open_a_trace(driver: WebDriver) -> str | None:
    """Click the newest listed trace through the most services (two at least: a worker's
    spans come up to 5 s after its sidecar's); its id once its waterfall shows (None:
    the rows moved under the click, to try again)."""
    for trace_id, services in sorted(traces(driver), key=lambda t: -t[1].count(" → ")):
        if " → " not in services:
            continue
        try:
            driver.find_element(By.CSS_SELECTOR, f'tr[data-trace-id="{trace_id}"]').click()
        except (NoSuchElementException, StaleElementReferenceException):
            return None
        shown = waterfall(driver)
        return trace_id if shown is not None and shown[0] == trace_id else None
    return None


def screenshot_path(tmp_path: Path) -> Path:
    where = os.environ.get("SHOAL_ARTIFACTS")
    folder = Path(where) if where else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "dashboard.png"


def test_the_dashboard_shows_instances_live_figures_traces_and_a_worker_going_down(
    tmp_path: Path, browser: WebDriver
) -> None:
    (tmp_path / "sidecar.yaml").write_text("membership: {ttl: 3}\n")
    (tmp_path / "mesh.yaml").write_text("sidecar: {config: sidecar.yaml}\n")
    # `shoal up` has every component send its spans to the dashboard; keep them all.
    mesh = start_mesh(
        tmp_path,
        *("--workers", "2", "--restart", "never", "--trace-sample", "1"),
        *("--config", str(tmp_path / "mesh.yaml")),
    )
    try:
        browser.get(mesh.address("dashboard"))
        wait = WebDriverWait(browser, 30, poll_frequency=0.2)
        wait.until(lambda d: len(rows(d)) == 2)
        assert all(row[1:] == ["healthy", "SERVING"] for row in rows(browser)), rows(browser)

        with echo_load(mesh.address("client-sidecar")):
            first: Any = wait.until(lambda d: (r := rps(d)) is not None and r > 0 and r)
            wait.until(lambda d: (r := rps(d)) is not None and r > 0 and r != first)
            # The client's calls, as the workers' sidecars saw them: the caller named by
            # its certificate, or "unknown" from a sidecar that does not name callers yet.
            wait.until(lambda d: any(e[1:] == ["worker", "inbound sidecars"] for e in edges(d)))
            [caller] = {e[0] for e in edges(browser) if e[1:] == ["worker", "inbound sidecars"]}
            assert caller in ("client", "unknown"), edges(browser)

            # A call's trace: listed, then clicked, its waterfall a row per span across
            # the hops, each with a bar.
            opened = wait.until(open_a_trace)
            assert opened is not None
            shown = waterfall(browser)
            assert shown is not None and shown[0] == opened
            assert len({service for service, _ in shown[1]}) >= 2, shown
            assert all(width.endswith("%") for _, width in shown[1]), shown

        os.kill(int(mesh.rows["worker-1"]["PID"]), signal.SIGKILL)
        wait.until(lambda d: sum(row[1:] != ["healthy", "SERVING"] for row in rows(d)) == 1)
        assert sum(row[1:] == ["healthy", "SERVING"] for row in rows(browser)) == 1
        assert browser.find_element("id", "stream").get_attribute("data-state") == "live"
        # Seconds of live updates later, the waterfall is still the one clicked.
        still = waterfall(browser)
        assert still is not None and still[0] == opened, still

        # The whole page, waterfall and all.
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, min(int(height) + 100, 6000))
        path = screenshot_path(tmp_path)
        assert browser.save_screenshot(str(path))
        print(f"dashboard screenshot: {path}")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    finally:
        stop_mesh(mesh)
    assert not alive(mesh.pids)
