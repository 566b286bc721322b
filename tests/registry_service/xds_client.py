"""A plain grpcio client of ``xds:///SERVICE``, run as its own process by test_xds.py.

Nothing of Shoal is imported: this is what any team's client looks like. It reads
the bootstrap named by GRPC_XDS_BOOTSTRAP (set by the parent before this process,
and so its grpc, started) and calls ``/test.Echo/Who`` until stdin closes, printing
one line per call: ``TIME NAME`` (the server that answered) or ``TIME ERR CODE``.
"""

from __future__ import annotations

import sys
import threading
import time

import grpc


def main(target: str, pause: float) -> None:
    stop = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    # The parent ends us by closing our stdin: no signal, nothing left behind.
    threading.Thread(target=until_stdin_closes, daemon=True).start()
    with grpc.insecure_channel(target) as channel:
        # No serializers: bytes in, bytes out.
        who = channel.unary_unary("/test.Echo/Who", None, None)
        while not stop.is_set():
            try:
                name = who(b"", timeout=2.0).decode()
            except grpc.RpcError as exc:
                name = f"ERR {exc.code().name}"
            print(f"{time.time():.3f} {name}", flush=True)
            stop.wait(pause)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
