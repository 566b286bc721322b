"""The spawner program: starts the worker's commands under rlimits it holds itself.

``worker_node.spawn`` runs it as ``python -I -S spawner.py FD LIMITS``. It uses
the standard library only and runs one thread, so it may set rlimits on itself
(``LIMITS`` is ``AS=soft:hard,CPU=...``) and start commands with a plain
vfork+exec: each command inherits them from its first instruction. ``FD`` is
its end of a SOCK_SEQPACKET socket pair. It says ``{"ready": cpu}``, then
answers each request (JSON, with the command's stdin, stdout and stderr as
SCM_RIGHTS file descriptors) with the command's pid or the OS error, and
reports each command's exit code. When the worker's end closes it kills what
is left of its commands' process groups and exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

MAX_MESSAGE = 256 * 1024


def _set_limits(encoded: str) -> None:
    for item in filter(None, encoded.split(",")):
        name, value = item.split("=")
        soft, hard = value.split(":")
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(soft), int(hard)))


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def _start(request: dict[str, Any], fds: list[int]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        request["argv"],
        stdin=fds[0],
        stdout=fds[1],
        stderr=fds[2],
        cwd=request["cwd"],
        env=request["env"],
        start_new_session=True,
    )


def _serve_request(sock: socket.socket, children: dict[int, subprocess.Popen[bytes]]) -> bool:
    """Start one requested command; False once the worker has gone."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 3)
    try:
        if not data:
            return False
        request = json.loads(data)
        try:
            if len(fds) != 3:
                raise OSError(0, f"expected 3 file descriptors, got {len(fds)}")
            proc = _start(request, fds)
        except Exception as exc:
            errno = exc.errno if isinstance(exc, OSError) else 0
            strerror = exc.strerror if isinstance(exc, OSError) else str(exc)
            _send(sock, {"id": request["id"], "errno": errno or 0, "error": strerror or str(exc)})
        else:
            children[proc.pid] = proc
            _send(sock, {"id": request["id"], "pid": proc.pid, "cpu": time.process_time()})
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _report_exits(sock: socket.socket, children: dict[int, subprocess.Popen[bytes]]) -> None:
    for pid, proc in list(children.items()):
        code = proc.poll()
        if code is not None:
            del children[pid]
            _send(sock, {"exit": pid, "code": code})


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    _set_limits(sys.argv[2])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    children: dict[int, subprocess.Popen[bytes]] = {}
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        _send(sock, {"ready": time.process_time()})
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    if not _serve_request(sock, children):
                        return
                else:
                    os.read(wake_r, 4096)
                # A SIGCHLD may arrive while a request is served: look after every event.
                _report_exits(sock, children)
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
