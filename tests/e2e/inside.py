"""What e2e tests run inside the mesh's containers: reading a page of a container's own
loopback (``/healthz``, ``/metrics``), and a proxyless client in the client's pod.

The proxyless client takes the user's steps (README, "Proxyless clients") in the client
sidecar's container, which holds the client's join token: ``shoal identity-agent``,
``shoal xds-bootstrap --cert-dir`` against ``registry:7700``, then plain grpcio calling
``upper`` on ``xds:///worker``, one line per call: the result, or ``ERR`` and why.
"""

from __future__ import annotations

import subprocess

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["metric", "page", "proxyless"]

_READ = (
    "import sys, urllib.request, urllib.error\n"
    "try: page = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
    "except urllib.error.HTTPError as exc: page = exc\n"
    "sys.stdout.write(page.read().decode())"
)

_CLIENT = """
import grpc, grpc.experimental, sys, time
from protos import worker_pb2, worker_pb2_grpc
calls, seconds, payload = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode()
creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
end = time.monotonic() + seconds
with grpc.secure_channel("xds:///worker", creds) as channel:
    stub = worker_pb2_grpc.WorkerStub(channel)
    made = 0
    while (not calls or made < calls) and (not seconds or time.monotonic() < end):
        made += 1
        try:
            request = worker_pb2.CallRequest(function="upper", payload=payload)
            print(stub.Call(request, timeout=10, wait_for_ready=True).result.decode(), flush=True)
        except grpc.RpcError as exc:
            print("ERR", exc.code().name, exc.details(), flush=True)
        time.sleep(0.05)
"""

_STEPS = """set -e
shoal identity-agent --token-file "$SHOAL_TOKEN_FILE" --service client --out /tmp/certs \\
    > /tmp/agent.log 2>&1 &
agent=$!
for _ in $(seq 100); do [ -f /tmp/certs/svid.pem ] && break; sleep 0.1; done
shoal xds-bootstrap --registry registry:7700 --node-id e2e --cert-dir /tmp/certs \\
    --out /tmp/xds.json > /dev/null
GRPC_XDS_BOOTSTRAP=/tmp/xds.json python -c "$CLIENT" "$CALLS" "$DURATION" "$PAYLOAD"
kill $agent
"""


def page(container: str, port: int, path: str) -> str:
    """The body at ``path`` on ``container``'s own 127.0.0.1:``port`` (an error's too)."""
    read = _READ.format(port=port, path=path)
    return subprocess.run(
        ["docker", "exec", container, "python", "-c", read],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip


def metric(container: str, port: int, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on ``container``'s /metrics whose labels include
    ``labels``; 0 for none."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(page(container, port, "/metrics"))
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def proxyless(
    client_sidecar: str, payload: str, *, calls: int = 0, seconds: float = 0
) -> subprocess.Popen[str]:
    """The proxyless client in the container ``client_sidecar``, making ``calls`` calls
    or calling for ``seconds`` (0: no bound of that kind); its lines on stdout."""
    env = {"CLIENT": _CLIENT, "CALLS": str(calls), "DURATION": f"{seconds:g}", "PAYLOAD": payload}
    flags = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    return subprocess.Popen(
        ["docker", "exec", *flags, client_sidecar, "bash", "-c", _STEPS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
