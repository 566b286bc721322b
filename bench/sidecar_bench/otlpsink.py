"""An OTLP/gRPC receiver that takes spans and counts them: the trace part's collector.

Run as ``python -m bench.sidecar_bench.otlpsink``; it prints ``serving on HOST:PORT``,
then ``received N spans`` on stdout each second the count moved, until SIGTERM. It
decodes each export (a collector would), so the sidecars' exporter sees a real answer.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc


class Sink(pb_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(  # noqa: N802 (the generated name)
        self, request: pb.ExportTraceServiceRequest, context: object
    ) -> pb.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans += len(scope.spans)
        return pb.ExportTraceServiceResponse()


async def main() -> None:
    sink = Sink()
    server = grpc.aio.server()
    pb_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"otlp sink serving on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    said = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
        if sink.spans != said:
            said = sink.spans
            print(f"received {said} spans", flush=True)
    await server.stop(1.0)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
