"""The stacks of the TLS part: two sidecars in a row, plaintext and on mTLS, and two nginx.

Each stack is two proxies in front of the worker, as the mesh runs: plaintext h2 from
the load generator into the first, the mesh hop between the two, plaintext h2 from the
second to the worker. The mTLS sidecars are certified as ``shoal up`` certifies them
(``shoal_cli.mesh.trust``: a CA and join tokens in the run's directory, an identity
server, the registry on mTLS too), so their hop is TLS 1.3 with client certificates.
nginx with TLS is the same shape: the first one ``grpc_pass grpcs://`` with a client
certificate, pooled (upstream keepalive), the second ``listen ... ssl http2`` with
``ssl_verify_client on``; leaves from the same CA, TLS 1.3 only, no session resumption
either side (the data plane has none). nginx plaintext, two in a row, is there to say
what TLS costs nginx.

The mesh hop's TLS listeners (the worker sidecar's inbound port, the second nginx) are
also where the handshake rounds connect, with the client's leaf and the bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from identity.ca import CA, load_ca
from identity.spiffe import SpiffeId
from identity.workload import Credentials, new_request
from shoal_cli.mesh.trust import MeshTrust, make_trust

from .measure import Meter
from .procs import Child, nginx, shoal
from .stacks import Target, ready
from .wire import SERVICE

__all__ = [
    "MTLS",
    "NGINX",
    "NGINX_TLS",
    "SIDECAR",
    "ClientFiles",
    "TlsPort",
    "TlsStacks",
    "inbound_address",
    "tls",
]

SIDECAR = "sidecar x2"
MTLS = "sidecar x2 mTLS"
NGINX = "nginx x2"
NGINX_TLS = "nginx x2 TLS"
# The service the worker sidecars register, as `shoal up` names it: its join token's.
WORKER = "worker"

# The second nginx: the mesh hop's server side, a client certificate required.
SERVER_TLS = """
        ssl_certificate {chain}; ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_cache off; ssl_session_tickets off;
        ssl_verify_client on; ssl_client_certificate {bundle}; ssl_verify_depth 2;
"""
# The first nginx: the mesh hop's client side, its certificate shown, the server's checked.
UPSTREAM_TLS = """
            grpc_ssl_certificate {chain}; grpc_ssl_certificate_key {key};
            grpc_ssl_trusted_certificate {bundle}; grpc_ssl_verify on; grpc_ssl_verify_depth 2;
            grpc_ssl_name {name}; grpc_ssl_server_name on;
            grpc_ssl_protocols TLSv1.3; grpc_ssl_session_reuse off;
"""


@dataclass(frozen=True)
class ClientFiles:
    """A leaf (with its chain), its key and the trust bundle, as files."""

    chain: Path
    key: Path
    bundle: Path


@dataclass(frozen=True)
class TlsPort:
    """A mesh hop's TLS listener, the name its leaf carries, and its server's processes."""

    address: str
    server_name: str
    meter: Meter


@dataclass
class TlsStacks:
    """The loaded stacks (direct first), the TLS listeners, and a client's certificate."""

    targets: dict[str, Target]
    ports: dict[str, TlsPort]
    client: ClientFiles
    # Each stack's processes, first proxy then second: for per-process figures.
    procs: dict[str, tuple[Child, ...]]


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def _leaf(ca: CA, service: str, directory: Path) -> ClientFiles:
    """A leaf for ``svc/service`` straight from the CA, written out for nginx and ssl."""
    key, _ = new_request()
    leaf = ca.issue(key.public_key(), SpiffeId.service(ca.trust_domain, service))
    held = Credentials(key, leaf.cert_pem + leaf.chain_pem, ca.bundle_pem)
    return ClientFiles(
        _write(directory / f"{service}.crt", held.chain_pem),
        _write(directory / f"{service}.key", held.key_pem),
        _write(directory / "bundle.crt", ca.bundle_pem),
    )


def inbound_address(child: Child) -> str:
    found = re.search(r"inbound on (\S+?)\)", child.ready_line)
    if found is None:
        raise RuntimeError(f"no inbound address in {child.ready_line.strip()!r}")
    return found.group(1)


async def _sidecars(
    stack: contextlib.AsyncExitStack, tmp: Path, upstream: str, trust: MeshTrust | None
) -> tuple[Child, Child]:
    """A registry and the two sidecars (client side, worker side); mTLS with ``trust``."""
    tag = "mtls" if trust else "plain"

    def env(role: str) -> dict[str, str] | None:
        return None if trust is None else trust.env(role)

    registry = await stack.enter_async_context(
        shoal(tmp / f"registry-{tag}.log", "registry", "--listen", "127.0.0.1:0",
              env=env("registry"))
    )  # fmt: skip
    worker_side = await stack.enter_async_context(
        shoal(tmp / f"worker-sidecar-{tag}.log", "sidecar", "--listen", "127.0.0.1:0",
              "--inbound", "127.0.0.1:0", "--registry", registry.address, "--service", WORKER,
              "--app", upstream, "--grpc-service", SERVICE, "--grace", "1", env=env(WORKER))
    )  # fmt: skip
    client_side = await stack.enter_async_context(
        shoal(tmp / f"client-sidecar-{tag}.log", "sidecar", "--listen", "127.0.0.1:0",
              "--registry", registry.address, "--grace", "1", env=env("client"))
    )  # fmt: skip
    return client_side, worker_side


async def tls(stack: contextlib.AsyncExitStack, tmp: Path, worker: Child) -> TlsStacks:
    """Start every stack of the TLS part; return them once each answers Echo."""
    upstream = worker.address
    trust = make_trust(tmp / "trust")
    identity = await stack.enter_async_context(
        shoal(tmp / "identity.log", "identity", "--ca", str(trust.ca_dir),
              "--listen", "127.0.0.1:0")
    )  # fmt: skip
    trust = dataclasses.replace(trust, identity_address=identity.address)
    plain = await _sidecars(stack, tmp, upstream, None)
    mtls = await _sidecars(stack, tmp, upstream, trust)

    ca = load_ca(trust.ca_dir)
    certs = tmp / "nginx-certs"
    certs.mkdir(mode=0o700)
    server, client = _leaf(ca, WORKER, certs), _leaf(ca, "client", certs)
    server_name = SpiffeId.service(ca.trust_domain, WORKER).dns_name
    ngx_tls_b = await stack.enter_async_context(
        nginx(tmp / "nginx-tls-b", upstream, server=SERVER_TLS.format(
            chain=server.chain, key=server.key, bundle=server.bundle))
    )  # fmt: skip
    ngx_tls_a = await stack.enter_async_context(
        nginx(tmp / "nginx-tls-a", ngx_tls_b.address, tls_upstream=True,
              location=UPSTREAM_TLS.format(chain=client.chain, key=client.key,
                                           bundle=client.bundle, name=server_name))
    )  # fmt: skip
    ngx_b = await stack.enter_async_context(nginx(tmp / "nginx-plain-b", upstream))
    ngx_a = await stack.enter_async_context(nginx(tmp / "nginx-plain-a", ngx_b.address))
    procs = {
        "direct": (worker,),
        SIDECAR: plain,
        MTLS: mtls,
        NGINX: (ngx_a, ngx_b),
        NGINX_TLS: (ngx_tls_a, ngx_tls_b),
    }
    targets = await ready(procs)
    # After the first calls, so nginx's worker is there to be measured with its master.
    ports = {
        MTLS: TlsPort(inbound_address(mtls[1]), server_name, Meter([mtls[1].pid])),
        NGINX_TLS: TlsPort(ngx_tls_b.address, server_name, Meter([ngx_tls_b.pid])),
    }
    return TlsStacks(targets, ports, client, procs)
