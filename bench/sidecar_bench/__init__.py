"""The sidecar against nginx and HAProxy in one run: ``python -m bench.sidecar_bench``.

Everything runs on 127.0.0.1: a ``shoal worker`` (the upstream), and in front of it a
``shoal sidecar``, nginx (``grpc_pass``, upstream keepalive, one worker) and HAProxy
(``mode http``, ``proto h2`` on the bind and the server line, ``nbthread 1``), as one
hop each; for the two-hop part, a client sidecar -> the worker's own sidecar -> the
worker as the mesh runs, against two nginx and two HAProxy in a row, and two of the
sidecar's data plane behind a control plane that decides nothing (``floor``): what the
data plane costs whatever Python decides.

Parts (``--only unary,stream,twohop,large,tls``): unary Echo under load and one call at
a time (h2load), memory (idle and loaded RSS), CallStream bidi (a grpc.aio load generator
in its own process, ``streamload``), two hops, 1 MiB / 4 MiB Echo, and TLS: two sidecars
in a row plaintext and on mTLS (certified as ``shoal up`` does it) against two nginx in a
row plaintext and with TLS between them (``grpc_pass grpcs://`` with a client
certificate, ``listen ... ssl http2`` with ``ssl_verify_client on``), CPU per call of
both proxies under load, then fresh mTLS connections a second to each mesh hop's TLS
listener and the server's CPU per handshake (``tlsstacks``, ``tls``, ``handshakes``). Each part runs
rounds that take the targets in turn and reports medians; ratios to direct are the
medians of each round's ratio. CPU is the proxy's user + system time (psutil) over a
fixed number of calls or messages, divided by them; context switches come from
``/proc/PID/task/*/status``; peak RSS from VmHWM, reset through ``clear_refs``.
h2load counts HTTP 200 as success even when grpc-status is an error, so every
response's DATA bytes are checked too. ``--quick`` runs each part briefly.

Needs ``h2load``, ``nginx`` and ``haproxy`` (Debian: nghttp2-client, nginx, haproxy).
"""

from __future__ import annotations

__all__: list[str] = []
