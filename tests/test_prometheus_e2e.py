"""A real Prometheus scraping a running mesh agrees with what a load generator saw.

A registry, two workers behind their sidecars and a client sidecar, all on
127.0.0.1:0 with their metrics pages; Debian's ``prometheus`` scrapes every one each
second. A known number of Echo calls goes through the client sidecar, timed one by one;
then Prometheus' HTTP API must count exactly those calls at every hop, and
``histogram_quantile(0.99, ...)`` must land where the measured p99 is, within the
histogram's resolution (its buckets are 2 to 2.5 times apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from proxy_sidecar import SidecarServer
from registry_service import RegistryServer
from tests.proxy_sidecar.conftest import FAST_REGISTRY, routable, sidecar_config, wait_for
from tests.worker_node.conftest import config as worker_config
from worker_node import WorkerServer

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is missing: install it with 'apt-get install prometheus' (Debian), "
    "or scripts/test does it as root",
)
WORKER = "shoal.worker.v1.Worker"
CALLS = 400


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Prometheus:
    """``prometheus`` scraping ``targets`` (job -> host:port list) every second."""

    def __init__(self, tmp: Path, targets: dict[str, list[str]]) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        config = tmp / "prometheus.yml"
        jobs = [
            {"job_name": job, "static_configs": [{"targets": hosts}]}
            for job, hosts in targets.items()
        ]
        config.write_text(
            json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                        "scrape_configs": jobs})
        )  # fmt: skip
        self._log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={self.address}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def query(self, expr: str) -> float | None:
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as reply:
            result = json.load(reply)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[tuple[SidecarServer, dict[str, list[str]]]]:
    config = sidecar_config(membership={"ttl": 1.5, "grpc_services": [WORKER]})
    async with contextlib.AsyncExitStack() as stack:
        registry = await stack.enter_async_context(
            RegistryServer("127.0.0.1:0", FAST_REGISTRY, metrics_listen="127.0.0.1:0")
        )
        targets: dict[str, list[str]] = {
            "registry": [f"127.0.0.1:{registry.metrics_port}"],
            "worker": [],
            "sidecar": [],
        }
        for _ in range(2):
            worker = await stack.enter_async_context(
                WorkerServer("127.0.0.1:0", worker_config(), metrics_listen="127.0.0.1:0")
            )
            targets["worker"].append(f"127.0.0.1:{worker.metrics_port}")
            sidecar = SidecarServer(
                "127.0.0.1:0",
                registry.address,
                config,
                service="worker",
                app=worker.address,
                inbound="127.0.0.1:0",
                admin="127.0.0.1:0",
            )
            await stack.enter_async_context(sidecar)
            targets["sidecar"].append(f"127.0.0.1:{sidecar.admin_port}")
        client = SidecarServer("127.0.0.1:0", registry.address, config, admin="127.0.0.1:0")
        await stack.enter_async_context(client)
        targets["sidecar"].append(f"127.0.0.1:{client.admin_port}")
        await wait_for(lambda: routable(client, WORKER) == 2, what="both workers routable")
        yield client, targets


async def _load(address: str) -> list[float]:
    """CALLS Echo calls, four at a time; each one's latency as the caller saw it."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wpb_grpc.WorkerStub(channel)
        left = iter(range(CALLS))

        async def caller() -> None:
            for _ in left:
                started = time.perf_counter()
                await stub.Echo(wpb.EchoRequest(payload=b"golden"), timeout=10)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(4)))
    return latencies


async def test_prometheus_counts_every_call_at_every_hop_and_its_p99_matches(tmp_path: Path):
    async with mesh() as (client, targets):
        prometheus = Prometheus(tmp_path, targets)
        try:
            up = 'sum(up{job=~"registry|worker|sidecar"})'
            await wait_for(lambda: prometheus_ready(prometheus, up, 6), timeout=60, what="scrapes")
            latencies = sorted(await _load(client.address))
            outbound = (
                'sum(shoal_sidecar_requests_total{direction="outbound",'
                f'service="{WORKER}",method="Echo",code="OK"}})'
            )
            inbound = outbound.replace("outbound", "inbound")
            at_workers = 'sum(shoal_worker_requests_total{method="Echo"})'
            for expr in (outbound, inbound, at_workers):

                def counted(expr: str = expr) -> bool:
                    return prometheus_ready(prometheus, expr, CALLS)

                await wait_for(counted, timeout=20, what=f"{expr} = {CALLS}")
            p99 = prometheus.query(
                "histogram_quantile(0.99, sum by (le) (shoal_sidecar_request_duration_seconds"
                '_bucket{direction="outbound",method="Echo"}))'
            )
        finally:
            prometheus.close()
    measured = latencies[int(len(latencies) * 0.99) - 1]
    assert p99 is not None
    print(f"p99: Prometheus {p99 * 1000:.2f} ms, load generator {measured * 1000:.2f} ms")
    # Within the histogram's resolution: its buckets are at most 2.5x apart.
    assert measured / 2.5 <= p99 <= measured * 2.5, (p99, measured)


def prometheus_ready(prometheus: Prometheus, expr: str, want: float) -> bool:
    try:
        return prometheus.query(expr) == want
    except OSError:
        return False  # not listening yet
