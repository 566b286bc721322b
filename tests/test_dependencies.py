"""The installed dependencies work together: what an install that went wrong breaks."""

from __future__ import annotations

import importlib


def test_xds_protos_left_opentelemetry_protos_whole() -> None:
    """xds-protos ships stale copies of opentelemetry-proto's modules (grpc/grpc#42926);
    the install scripts put the real ones back. Tracing needs them, the registry's xDS
    its envoy modules: both must import in one process."""
    common = importlib.import_module("opentelemetry.proto.common.v1.common_pb2")
    assert hasattr(common, "InstrumentationScope"), "opentelemetry-proto was overwritten"
    importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    ads = importlib.import_module("envoy.service.discovery.v3.ads_pb2_grpc")
    assert hasattr(ads, "AggregatedDiscoveryServiceServicer")
