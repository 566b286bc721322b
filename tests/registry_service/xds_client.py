"""A plain grpcio client of ``xds:///SERVICE``, run as its own process by test_xds.py
and test_xds_policy.py.

Nothing of Shoal is imported: this is what any team's client looks like. It reads
the bootstrap named by GRPC_XDS_BOOTSTRAP (set by the parent before this process,
and so its grpc, started) and calls ``/test.Echo/Who`` until stdin closes, printing
one line per call: ``TIME NAME`` (the server that answered) or ``TIME ERR CODE``.

Optional arguments: KEYS, comma-separated values sent in turn as the ``x-key``
metadata (the line then ends with `` KEY``), and THREADS calling at once.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time

import grpc


def main(target: str, pause: float, keys: list[str], threads: int) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    turns = itertools.cycle(keys or [""])

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    def call_in_a_loop(who: grpc.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        while not stop.is_set():
            with lock:
                key = next(turns)
            metadata = (("x-key", key),) if key else None
            try:
                name = who(b"", timeout=2.0, metadata=metadata).decode()
            except grpc.RpcError as exc:
                name = f"ERR {exc.code().name}"
            with lock:  # one whole line at a time, from any thread
                print(f"{time.time():.3f} {name}" + (f" {key}" if key else ""), flush=True)
            stop.wait(pause)

    # The parent ends us by closing our stdin: no signal, nothing left behind.
    threading.Thread(target=until_stdin_closes, daemon=True).start()
    with grpc.insecure_channel(target) as channel:
        # No serializers: bytes in, bytes out.
        who = channel.unary_unary("/test.Echo/Who", None, None)
        callers = [threading.Thread(target=call_in_a_loop, args=(who,)) for _ in range(threads)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()


if __name__ == "__main__":
    keys = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else []
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    main(sys.argv[1], float(sys.argv[2]), keys, threads)
