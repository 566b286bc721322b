"""CLI fixtures: `shoal` run as a user runs it, in real processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc

SHOAL = [sys.executable, "-m", "shoal_cli.main"]


@pytest.fixture
def registry_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "SHOAL_REGISTRY_LISTEN": "127.0.0.1:0", "SHOAL_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [*SHOAL, "registry", "--sweep-interval", "0.2", "--grace", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("shoal registry serving on "), (
            line,
            proc.stderr.read() if proc.stderr else "",
        )
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        reap(proc)


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs, wait for it, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def call_in_flight(via: str, worker: str) -> Iterator[None]:
    """A 30 s call through ``via`` that is running on the worker at ``worker`` meanwhile.

    A sidecar draining with a call in flight waits for it (up to its grace), which
    holds a mesh's ordered stop at that sidecar for seconds.
    """
    proc = subprocess.Popen(
        [*SHOAL, "call", "sleep", "--data", "30", "--via", via],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(worker) as channel:
            stub = wpb_grpc.WorkerStub(channel)
            deadline = time.monotonic() + 30
            while stub.Stats(wpb.StatsRequest(), timeout=5).tasks_running < 1:
                assert time.monotonic() < deadline, "the call never started on the worker"
                time.sleep(0.05)
        yield
    finally:
        proc.kill()
        proc.wait()


def wait_for_text(path: Path, text: str, timeout: float = 30.0) -> None:
    """Until ``text`` shows in the file at ``path``."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} never showed in {path}"
        time.sleep(0.05)
