"""The program each pool process runs: ``python -m worker_node.child``.

It talks to the worker over its original stdin/stdout (see ``protocol``); its
fd 1 is then pointed at stderr so that prints in user functions cannot corrupt
the stream. It imports the configured functions, runs their warm-up calls,
says READY and then runs tasks one at a time in arrival order, each within its
CPU budget (``limits.TaskCpuLimit``) and, for a traced call, with its trace
context readable through ``worker_node.tracecontext``. It never imports
grpc. If the worker disappears it kills its own process group, so a crash of
the worker cannot leave orphans working on.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from worker_node import tracecontext
from worker_node.limits import LimitSpec, TaskCpuLimit, apply_rlimits
from worker_node.protocol import INIT, REPLY, REQUEST, STOP, TRACE, Status, encode_reply

__all__ = ["main"]

Function = Callable[[bytes], Any]
READ_SIZE = 256 * 1024
# Results are written in bursts, but never held back longer than this.
FLUSH_AFTER = 0.0005


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            if os.name == "posix":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os._exit(70)


def _load(spec: dict[str, Any], before: Callable[[int, float], None]) -> list[Function]:
    functions: list[Function] = []
    for index, (name, target, warmup) in enumerate(spec["functions"]):
        module_name, _, attr = target.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            raise RuntimeError(
                f"function {name!r}: cannot load {target!r} ({type(exc).__name__}: {exc})"
            ) from exc
        if not callable(fn):
            raise RuntimeError(f"function {name!r}: {target!r} is not callable")
        if warmup is not None:
            before(index, time.perf_counter())
            try:
                fn(warmup.encode())
            except Exception as exc:
                raise RuntimeError(
                    f"function {name!r}: warm-up call failed ({type(exc).__name__}: {exc})"
                ) from exc
        functions.append(fn)
    return functions


def _run(fn: Function, payload: bytes, max_result: int) -> tuple[Status, bytes]:
    try:
        result = fn(payload)
    except Exception as exc:
        return Status.ERROR, f"{type(exc).__name__}: {exc}"[:4000].encode()
    if not isinstance(result, bytes | bytearray | memoryview):
        return Status.ERROR, f"returned {type(result).__name__}, expected bytes".encode()
    if len(result) > max_result:
        message = f"result is {len(result)} bytes; the limit is {max_result}"
        return Status.TOO_LARGE, message.encode()
    return Status.OK, bytes(result)


def _serve(
    fd_in: int,
    fd_out: int,
    functions: list[Function],
    max_result: int,
    before: Callable[[int, float], None] | None,
) -> None:
    buf = bytearray()
    header = REQUEST.size
    traced: bytes | None = None  # a TRACE frame's body, for the task frame after it
    while True:
        chunk = os.read(fd_in, READ_SIZE)
        if not chunk:
            return
        buf += chunk
        pos = 0
        out: list[bytes] = []
        first_pending = 0.0
        while len(buf) - pos >= header:
            size, task_id, index = REQUEST.unpack_from(buf, pos)
            end = pos + header + size
            if len(buf) < end:
                break
            if index == STOP:
                _write_all(fd_out, b"".join(out))
                return
            payload = bytes(buf[pos + header : end])
            pos = end
            if index == TRACE:
                traced = payload
                continue
            started = time.perf_counter()
            if before is not None:
                before(index, started)
            if traced is None:
                status, body = _run(functions[index], payload, max_result)
            else:
                tracecontext.enter(traced)
                traced = None
                try:
                    status, body = _run(functions[index], payload, max_result)
                finally:
                    tracecontext.leave()
            done = time.perf_counter()
            out.append(REPLY.pack(len(body), task_id, status, done - started) + body)
            if len(out) == 1:
                first_pending = started
            # Flush when nothing else is ready or a result has waited long enough.
            if len(buf) - pos < header or done - first_pending > FLUSH_AFTER:
                _write_all(fd_out, b"".join(out))
                out.clear()
        if out:
            _write_all(fd_out, b"".join(out))
        del buf[:pos]


def _read_init(fd_in: int) -> dict[str, Any]:
    buf = b""
    while len(buf) < REQUEST.size:
        chunk = os.read(fd_in, REQUEST.size - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    size, _, index = REQUEST.unpack(buf)
    if index != INIT:
        raise SystemExit("worker_node.child: expected an init frame")
    body = b""
    while len(body) < size:
        chunk = os.read(fd_in, size - len(body))
        if not chunk:
            raise SystemExit(0)
        body += chunk
    spec: dict[str, Any] = json.loads(body)
    return spec


def main() -> None:
    fd_in, fd_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    # The worker decides when pool processes stop; a terminal's Ctrl-C is for the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    spec = _read_init(fd_in)
    try:
        apply_rlimits(LimitSpec(**spec["limits"]))
        budgets = spec["cpu_budgets"]
        cpu = TaskCpuLimit(budgets).before if any(b is not None for b in budgets) else None
        if spec.get("cwd"):
            os.chdir(spec["cwd"])
        functions = _load(spec, cpu or (lambda _index, _now: None))
    except Exception as exc:
        message = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        _write_all(fd_out, encode_reply(0, Status.INIT_FAILED, 0.0, message.encode()))
        raise SystemExit(3) from None
    _write_all(fd_out, encode_reply(0, Status.READY, 0.0, b""))
    _serve(fd_in, fd_out, functions, int(spec["max_result"]), cpu)


if __name__ == "__main__":
    main()
