"""``shoal dashboard``: a live web page of a running mesh.

Layers, each knowing only the ones below it:

- ``figures``: rates, error shares and quantiles from scraped counters (pure);
- ``model``: the instances, events and scrape targets the dashboard knows (pure);
- ``summary``: the JSON snapshot the page shows: services, instances, edges, denials
  (pure);
- ``traces``: the recent traces received, bounded, and what the page shows of them (pure);
- ``sources``: the registry's Watch and the sidecars' ``/metrics`` pages, feeding ``model``;
- ``otlp``: the OTLP/gRPC trace receiver, feeding ``traces``;
- ``app``: the Starlette routes: the page, ``/api/snapshot``, ``/events`` (SSE);
- ``server``: ``DashboardServer``, which owns all of it and serves ``app`` with uvicorn.

Nothing is imported here, so that the pure modules load without grpc or Starlette.
"""
