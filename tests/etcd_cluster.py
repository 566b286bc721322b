"""A real etcd cluster on 127.0.0.1 for tests: N members of Debian's ``etcd``.

Each member is a subprocess with its own data dir and log under the test's tmp path and
its own client and peer ports. Elections are short (50 ms heartbeats, 500 ms election
timeout) so that losing the leader costs a test about a second, and watches get a
progress notification every second. The processes are plain ``subprocess.Popen``s, not
asyncio ones, so a cluster may outlive the event loop that started it (a module-scoped
fixture serves tests that each run on their own loop).

    async with EtcdCluster(tmp_path, members=3) as cluster:
        client = EtcdClient(cluster.endpoints)
        await cluster.stop(await cluster.leader())

Tests take the module-scoped ``etcd_cluster`` fixture with
``from tests.etcd_cluster import etcd_cluster_fixture  # noqa: F401``; one that stops or
restarts members starts its own cluster, since what it starts must end with it.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import pytest
import pytest_asyncio

from registry_service.etcd import EtcdClient, EtcdError, WatchEvent
from tests.etcd_pki import EtcdPki

ETCD = shutil.which("etcd")
MISSING = (
    "etcd is missing: install it with 'apt-get install etcd-server' (Debian), "
    "or scripts/test does it as root"
)
requires_etcd = pytest.mark.skipif(ETCD is None, reason=MISSING)


class ClusterError(Exception):
    """The cluster did not come up, or a member did not, within the time allowed."""


def free_ports(count: int) -> list[int]:
    """Ports free a moment ago: held all at once so they differ, then let go for etcd."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


async def next_events(watch: AsyncIterator[object], count: int) -> list[WatchEvent]:
    """The next ``count`` events of an ``EtcdClient.watch``, passing over progress
    notifications; within 10 s."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(10):
        async for item in watch:
            if isinstance(item, WatchEvent):
                events.append(item)
                if len(events) == count:
                    break
    return events


class EtcdCluster:
    """``members`` etcd processes forming one cluster; ``async with`` starts and reaps it."""

    def __init__(
        self,
        tmp: Path,
        members: int = 3,
        *,
        start_timeout: float = 30.0,
        pki: EtcdPki | None = None,
    ) -> None:
        self.tmp = tmp
        self.size = members
        self.start_timeout = start_timeout
        # With ``pki``: clients speak TLS and must show a certificate of its CA.
        self.pki = pki
        self.client_tls = None if pki is None else pki.client
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._plan()

    def _plan(self) -> None:
        ports = free_ports(2 * self.size)
        self._client_ports, self._peer_ports = ports[: self.size], ports[self.size :]
        self.endpoints = [f"127.0.0.1:{port}" for port in self._client_ports]
        # A fresh token per start: members of two clusters can never take each other in.
        self._token = f"shoal-test-{uuid.uuid4().hex[:12]}"
        self._run = self.tmp / f"etcd-{self._token}"

    def log(self, i: int) -> Path:
        return self._run / f"m{i}.log"

    async def __aenter__(self) -> EtcdCluster:
        try:
            try:
                await self._start_all()
            except ClusterError:
                # Another process may have taken a port between free_ports and etcd's bind.
                if not any("address already in use" in self._text(i) for i in range(self.size)):
                    raise
                self._kill_all()
                self._plan()
                await self._start_all()
        except BaseException:
            self._kill_all()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._kill_all()

    async def _start_all(self) -> None:
        for i in range(self.size):
            self._spawn(i, "new")
        await self.wait_healthy(self.start_timeout)

    def _spawn(self, i: int, state: str) -> None:
        assert ETCD is not None, MISSING
        peers = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(self._peer_ports))
        scheme = "http" if self.pki is None else "https"
        client, peer = f"{scheme}://{self.endpoints[i]}", f"http://127.0.0.1:{self._peer_ports[i]}"
        argv = [
            ETCD, "--name", f"m{i}", "--data-dir", str(self._run / f"m{i}"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", peers, "--initial-cluster-token", self._token,
            "--initial-cluster-state", state,
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--experimental-watch-progress-notify-interval", "1s",
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.pki is not None:
            argv += [
                "--cert-file", str(self.pki.server), "--key-file", str(self.pki.server_key),
                "--trusted-ca-file", str(self.pki.ca), "--client-cert-auth",
            ]  # fmt: skip
        self._run.mkdir(parents=True, exist_ok=True)
        with open(self.log(i), "ab") as log:
            self._procs[i] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def running(self) -> list[int]:
        return [i for i, proc in enumerate(self._procs) if proc is not None]

    async def wait_healthy(self, timeout: float = 30.0) -> int:
        """Wait until every running member follows one leader, itself running; return
        that leader's index."""
        deadline = time.monotonic() + timeout
        # A member still joining holds a call rather than refusing it: ask again soon.
        # Not too soon with TLS: a handshake cut off by the timeout leaks its socket
        # (httpcore's, until it is collected) and the test fails on the warning.
        patience = 0.5 if self.client_tls is None else 3.0
        async with EtcdClient(self.endpoints, timeout=patience, tls=self.client_tls) as client:
            while True:
                for i in self.running():
                    if (proc := self._procs[i]) is not None and proc.poll() is not None:
                        raise ClusterError(f"etcd m{i} exited ({proc.returncode}): {self._tail(i)}")
                try:
                    ids, leaders = {}, set()
                    for i in self.running():
                        status = await client.status(self.endpoints[i])
                        ids[status.member_id] = i
                        leaders.add(status.leader)
                    if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                        return ids[leader]
                except EtcdError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"etcd not healthy within {timeout}s; logs in {self._run}")
                await asyncio.sleep(0.05)

    async def leader(self) -> int:
        """The index of the leader that every running member follows (waits for one)."""
        return await self.wait_healthy()

    async def stop(self, i: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop member ``i`` with ``sig`` (SIGTERM: etcd's clean stop) and reap it."""
        proc = self._procs[i]
        assert proc is not None, f"etcd m{i} is not running"
        proc.send_signal(sig)
        deadline = time.monotonic() + 10.0
        while proc.poll() is None:
            if time.monotonic() > deadline:  # a clean stop that hangs
                proc.kill()
                deadline = float("inf")
            await asyncio.sleep(0.02)
        self._procs[i] = None

    async def start(self, i: int) -> None:
        """Start stopped member ``i`` again on its data dir and ports; wait until healthy."""
        assert self._procs[i] is None, f"etcd m{i} is running"
        self._spawn(i, "existing")
        await self.wait_healthy()

    def _kill_all(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc is not None:
                proc.kill()
                proc.wait()
                self._procs[i] = None

    def _text(self, i: int) -> str:
        try:
            return self.log(i).read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self, i: int) -> str:
        return " | ".join(self._text(i).splitlines()[-3:])


# Named apart from its function, so that a test module imports it without the name being
# shadowed by each test's ``etcd_cluster`` argument.
@pytest_asyncio.fixture(name="etcd_cluster", scope="module", loop_scope="module")
async def etcd_cluster_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[EtcdCluster]:
    """One 3-member cluster for a test module; tests must not stop its members."""
    if ETCD is None:
        pytest.skip(MISSING)
    async with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster
