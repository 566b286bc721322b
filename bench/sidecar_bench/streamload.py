"""The streaming load: CallStream bidi, S streams each keeping M messages outstanding.

h2load cannot drive a bidi stream, so this small grpc.aio client does, in a process of
its own (only the proxy's CPU is measured, so the client's cost does not count). Each
message is a CallBatch of one ``echo`` item (64 bytes); its result must come back whole.

``python -m bench.sidecar_bench.streamload ADDRESS --streams 4 --outstanding 64`` warms
up, prints ``ready``, then for each number N read on stdin sends N messages spread over
the streams and prints one JSON line ``{"messages", "failed", "seconds", "note"}``.
End of input ends it. ``StreamLoad`` runs it from the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos import worker_pb2 as pb
from protos import worker_pb2_grpc as pb_grpc

__all__ = ["StreamLoad", "stream_load"]

PAYLOAD = b"x" * 64


async def _one_stream(stub: Any, count: int, outstanding: int) -> tuple[int, str]:
    """Send ``count`` messages with at most ``outstanding`` unanswered; (good results, note)."""
    call = stub.CallStream()
    room = asyncio.Semaphore(outstanding)

    async def write() -> None:
        for i in range(count):
            await room.acquire()
            item = pb.CallItem(id=i, function="echo", payload=PAYLOAD)
            await call.write(pb.CallBatch(items=[item]))
        await call.done_writing()

    writer = asyncio.create_task(write())
    good = seen = 0
    note = ""
    try:
        while seen < count:
            reply = await call.read()
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                note = f"stream ended after {seen} of {count} results"
                break
            for result in reply.results:
                seen += 1
                if result.code == 0 and result.result == PAYLOAD:
                    good += 1
                elif not note:
                    note = f"result code {result.code}: {result.message[:80]}"
                room.release()
        await writer
        code = await call.code()
        if code != grpc.StatusCode.OK and not note:
            note = f"{code.name}: {(await call.details() or '')[:80]}"
    except grpc.aio.AioRpcError as exc:
        note = f"{exc.code().name}: {(exc.details() or '')[:80]}"
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await writer
        call.cancel()
    return good, note


async def _round(stub: Any, messages: int, streams: int, outstanding: int) -> dict[str, Any]:
    shares = [messages // streams + (i < messages % streams) for i in range(streams)]
    start = time.perf_counter()
    results = await asyncio.gather(*(_one_stream(stub, n, outstanding) for n in shares))
    seconds = time.perf_counter() - start
    good = sum(g for g, _ in results)
    note = next((n for _, n in results if n), "")
    return {"messages": good, "failed": messages - good, "seconds": seconds, "note": note}


async def stream_load(address: str, streams: int, outstanding: int) -> None:
    """The load generator's main loop (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        await _round(stub, streams * outstanding * 4, streams, outstanding)
        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            result = await _round(stub, int(line), streams, outstanding)
            print(json.dumps(result), flush=True)


class StreamLoad:
    """A running load generator for one target; ``run(n)`` is one measured round."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, address: str, streams: int, outstanding: int) -> AsyncIterator[StreamLoad]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.sidecar_bench.streamload", address,
            "--streams", str(streams), "--outstanding", str(outstanding),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"stream load for {address} did not start: {line!r}")
            yield cls(proc)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def run(self, messages: int) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{messages}\n".encode())
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), 180)
        if not line:
            raise RuntimeError("the stream load generator ended early")
        result: dict[str, Any] = json.loads(line)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--outstanding", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(stream_load(args.address, args.streams, args.outstanding))


if __name__ == "__main__":
    main()
