"""Functions the tests run in pool processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def trace_context(payload: bytes) -> bytes:
    """The running call's trace context, as the accessor gives it: JSON [parent, state]."""
    import json

    from worker_node.tracecontext import current_traceparent, current_tracestate

    return json.dumps([current_traceparent(), current_tracestate()]).encode()


def pid(payload: bytes) -> bytes:
    return str(os.getpid()).encode()


def spawn_and_hang(payload: bytes) -> bytes:
    """Start a grandchild, write its pid to the file named in the payload, then hang."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(payload.decode()).write_text(str(child.pid))
    time.sleep(60)
    return b""


def exit_clean(payload: bytes) -> bytes:
    os._exit(0)


def terminate_self(payload: bytes) -> bytes:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    return b""


def wrong_type(payload: bytes) -> bytes:
    return 42  # type: ignore[return-value]


def big(payload: bytes) -> bytes:
    return b"x" * int(payload.decode())


def slow_upper(payload: bytes) -> bytes:
    time.sleep(0.3)
    return payload.upper()


def limits(payload: bytes) -> bytes:
    """This process's rlimits as JSON: [soft, hard] by name; CPU's soft as seconds left."""
    import json
    import resource

    out: dict[str, list[float | None]] = {}
    for name in ("AS", "NOFILE", "CPU"):
        soft, hard = resource.getrlimit(getattr(resource, "RLIMIT_" + name))
        out[name] = [None if v == resource.RLIM_INFINITY else v for v in (soft, hard)]
    cpu_soft = out["CPU"][0]
    if cpu_soft is not None:
        out["CPU"][0] = cpu_soft - time.process_time()
    return json.dumps(out).encode()


def reserve(payload: bytes) -> bytes:
    """Map (without touching) as many MiB of address space as the payload says."""
    import mmap

    with mmap.mmap(-1, int(payload.decode()) * 1024 * 1024):
        return b"mapped"


def spin(payload: bytes) -> bytes:
    while True:
        pass


def burn(payload: bytes) -> bytes:
    """Use the payload's number of seconds of CPU time, then return this pid."""
    end = time.process_time() + float(payload.decode())
    while time.process_time() < end:
        pass
    return str(os.getpid()).encode()
