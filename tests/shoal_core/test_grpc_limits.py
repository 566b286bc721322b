"""What a misbehaving HTTP/2 client can do to a Shoal gRPC server: real servers, raw h2 peers.

Limits that take minutes in production (connection age, ping timeout, the stream cap)
are shortened through ``GrpcServer.limits``; everything else is the servers' default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil

from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from registry_service import RegistryServer
from tests.h2peers import NonReader, RapidReset
from tests.registry_service.conftest import instance, read
from worker_node import WorkerServer

DISCOVER = "/shoal.registry.v1.Registry/Discover"
ECHO = "/shoal.worker.v1.Worker/Echo"
ENHANCE_YOUR_CALM = 11
MIB = 1024 * 1024


async def _discover_until(done: asyncio.Future[RapidReset], stub: pb_grpc.RegistryAsyncStub) -> int:
    """A well-behaved client on its own connection, calling until ``done``; returns its count."""
    served = 0
    while not done.done():
        await stub.Discover(pb.DiscoverRequest(), timeout=10)
        served += 1
        await asyncio.sleep(0.05)
    return served


async def test_a_rapid_reset_client_is_refused_then_sent_away_while_others_are_served() -> None:
    server = RegistryServer("127.0.0.1:0")
    server.limits = dataclasses.replace(server.limits, max_connection_age=1.0)
    async with server, grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        await stub.Discover(pb.DiscoverRequest(), timeout=10)
        attacker = RapidReset(server.port, DISCOVER, max_streams=1_000_000, seconds=60.0)
        attack = asyncio.ensure_future(asyncio.to_thread(attacker.run))
        served = await _discover_until(attack, stub)
        await attack
        await stub.Discover(pb.DiscoverRequest(), timeout=10)
    seen = attacker.seen
    assert seen.goaway is not None, f"no GOAWAY after {attacker.streams} reset streams: {seen}"
    assert bytes(seen.goaway.additional_data) == b"max_age"
    # Past the stream cap the server refuses new streams instead of taking them on.
    assert seen.refused > 0
    assert served > 0


async def test_a_resetting_client_that_ignores_pings_is_sent_away_for_calm() -> None:
    server = RegistryServer("127.0.0.1:0")
    server.limits = dataclasses.replace(server.limits, ping_timeout=1.0)
    async with server:
        attacker = RapidReset(
            server.port, DISCOVER, max_streams=1_000_000, seconds=15.0, answer_pings=False
        )
        await asyncio.to_thread(attacker.run)
    seen = attacker.seen
    assert seen.pings > 0, "resets make the server ask for a PING"
    assert seen.goaway is not None, f"no GOAWAY after {attacker.streams} reset streams: {seen}"
    goaway = (seen.goaway.error_code, bytes(seen.goaway.additional_data))
    assert goaway == (ENHANCE_YOUR_CALM, b"ping_timeout"), seen


async def test_a_watch_stream_outlives_the_connection_age() -> None:
    server = RegistryServer("127.0.0.1:0")
    server.limits = dataclasses.replace(server.limits, max_connection_age=0.5)
    async with server, grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        watch = stub.Watch(pb.WatchRequest(service="echo"))
        assert (await read(watch)).type == pb.WatchEvent.SNAPSHOT
        # A raw peer connected as long as the watch sees the age's GOAWAY arrive...
        peer = RapidReset(server.port, DISCOVER, max_streams=0, seconds=20.0)
        await asyncio.to_thread(peer.run)
        assert peer.seen.goaway is not None and peer.seen.goaway.additional_data == b"max_age"
        # ...and the watch, on a connection that got the same GOAWAY, still delivers.
        await stub.Register(pb.RegisterRequest(instance=instance(1)), timeout=10)
        event = await read(watch)
        while event.type == pb.WatchEvent.PROGRESS:
            event = await read(watch)
        assert [i.instance_id for i in event.instances] == ["echo-1"]
        watch.cancel()


async def test_a_non_reading_client_holds_no_more_calls_than_the_stream_cap() -> None:
    server = WorkerServer("127.0.0.1:0")
    server.limits = dataclasses.replace(server.limits, max_concurrent_streams=8)
    async with server:
        client = NonReader(server.port, ECHO, calls=20, payload=b"p" * 1024)
        await asyncio.to_thread(client.send_all, 20.0)
        await asyncio.to_thread(client.hold, 0.5)
        client.vanish()
    assert len(client.answered) <= 8
    assert len(client.refused) >= 12


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def test_a_non_reading_client_that_vanishes_is_one_quiet_line_and_its_memory_returns(
    tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal_cli.main", "worker", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "SHOAL_LOG_LEVEL": "DEBUG"},
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        port = int(line.rsplit(":", 1)[1])
        before = _rss(proc.pid)
        client = NonReader(port, ECHO, calls=40, payload=os.urandom(MIB))
        await asyncio.to_thread(client.send_all, 60.0)
        await asyncio.to_thread(client.hold, 1.0)
        during = _rss(proc.pid)
        client.vanish()
        # The 40 replies it never read are let go of: RSS comes back to near where it was.
        deadline = time.monotonic() + 30
        while _rss(proc.pid) > before + 64 * MIB and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        after = _rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        assert proc.stdout is not None
        proc.stdout.close()
    text = log.read_text()
    assert len(client.answered) == 40, "the scenario really held 40 replies"
    assert during > before + 40 * MIB, "the scenario really loaded the worker"
    assert after <= before + 64 * MIB, f"RSS {before >> 20} -> {during >> 20} -> {after >> 20} MiB"
    assert "ERROR" not in text and "Traceback" not in text, text
    quiet = [ln for ln in text.splitlines() if re.search(r"DEBUG .*client went away", ln)]
    assert quiet, text
