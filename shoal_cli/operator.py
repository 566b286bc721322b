"""How operator commands reach a registry: over mTLS as an operator, with nothing to set.

An operator command (``shoal ls``, ``watch``, ``stats``, ``policy`` ...) is given a
registry address, or several: replicas of one registry, asked in turn until one is
reached (``ask_registry``). It finds how to prove who it is in this order:

1. ``SHOAL_IDENTITY_SERVER``, ``SHOAL_TRUST_BUNDLE`` and a token (``SHOAL_TOKEN`` or
   ``SHOAL_TOKEN_FILE``) in the environment: any mesh, say one in containers;
2. the record ``shoal up`` keeps for each mesh it runs on this machine, found by the
   registry's address (any of those given), so ``shoal ls --registry 127.0.0.1:9100``
   works for a mesh on any base port;
3. neither: plaintext, which only a registry run ``--insecure`` accepts.

The token is spent on a fresh leaf for each command (a CSR and one Certify call), so no
certificate is kept on disk and none outlives its short life.

Records live in ``$XDG_RUNTIME_DIR/shoal/meshes`` (else ``~/.local/state/shoal/meshes``),
readable by their owner only; ``shoal up`` removes its record when it stops, and a record
whose ``shoal up`` is gone is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from identity.spiffe import SpiffeId
from identity.workload import Credentials
from shoal_cli.errors import UserError
from shoal_cli.mesh_tls import join_token
from shoal_core.addresses import parse_address
from shoal_core.certify_client import certify_as
from shoal_core.certifying import MeshIdentity
from shoal_core.files import write_atomic
from shoal_core.replicas import parse_registries
from shoal_core.tls import channel_credentials, target_options

__all__ = [
    "ask_registry",
    "forget_mesh",
    "operator_identity",
    "record_mesh",
    "registry_channel",
]

T = TypeVar("T")


def records_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path.home() / ".local" / "state"
    return base / "shoal" / "meshes"


def _record_path(registry: str) -> Path:
    where = parse_address(registry)
    host = "127.0.0.1" if where.host in ("localhost", "0.0.0.0") else where.host.strip("[]")
    return records_dir() / f"{host.replace(':', '_')}_{where.port}.json"


def record_mesh(registry: str, identity_server: str, bundle: Path, token_file: Path) -> Path:
    """Note that ``registry``'s mesh admits operators with ``token_file`` (by ``shoal up``)."""
    path = _record_path(registry)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _prune(path.parent)
    body = {
        "registry": registry,
        "identity_server": identity_server,
        "trust_bundle": str(bundle),
        "token_file": str(token_file),
        "pid": os.getpid(),
    }
    write_atomic(path, json.dumps(body).encode(), 0o600)
    return path


def _prune(directory: Path) -> None:
    """Remove the records of meshes whose ``shoal up`` is gone (killed: it could not)."""
    for old in directory.glob("*.json"):
        try:
            if not _alive(int(json.loads(old.read_text())["pid"])):
                old.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            old.unlink(missing_ok=True)  # unreadable: no use to anyone


def forget_mesh(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _from_record(registry: str) -> MeshIdentity | None:
    try:
        body = json.loads(_record_path(registry).read_text())
        if not _alive(int(body["pid"])):
            return None
        token = Path(body["token_file"]).read_text()
        return MeshIdentity.load(body["identity_server"], Path(body["trust_bundle"]), token)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, or one left by a mesh that is gone


def operator_identity(registry: str | Sequence[str]) -> MeshIdentity | None:
    """How to certify as an operator for the mesh of ``registry`` (an address, or the
    replicas of one registry: the first with a record says); None: plaintext."""
    server = os.environ.get("SHOAL_IDENTITY_SERVER")
    bundle_path = os.environ.get("SHOAL_TRUST_BUNDLE")
    if server and bundle_path:
        token_file = os.environ.get("SHOAL_TOKEN_FILE")
        try:
            token = join_token(Path(token_file) if token_file else None)
            return MeshIdentity.load(server, Path(bundle_path), token)
        except (OSError, ValueError) as exc:
            raise UserError(f"SHOAL_TRUST_BUNDLE or SHOAL_TOKEN_FILE: {exc}") from None
    for address in (registry,) if isinstance(registry, str) else registry:
        found = _from_record(address)
        if found is not None:
            return found
    return None


async def _operator(mesh: MeshIdentity) -> Credentials:
    held = await certify_as(mesh)
    if held.identity.kind != "operator":
        raise UserError(f"the token admits {held.identity}, not an operator")
    return held


@contextlib.asynccontextmanager
async def _channel(
    registry: str, mesh: MeshIdentity | None, held: Credentials | None
) -> AsyncIterator[grpc.aio.Channel]:
    if mesh is None or held is None:
        async with grpc.aio.insecure_channel(registry) as channel:
            yield channel
        return
    registry_id = SpiffeId(mesh.trust_domain, "registry")
    async with grpc.aio.secure_channel(
        registry, channel_credentials(held), options=target_options(registry_id)
    ) as channel:
        yield channel


@contextlib.asynccontextmanager
async def registry_channel(
    registry: str, mesh: MeshIdentity | None = None, *, among: Sequence[str] = ()
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to ``registry``: mTLS as an operator when this machine knows how, for
    it or any replica ``among`` those it was given (or by ``mesh``, when the caller
    knows: ``shoal up`` itself)."""
    mesh = mesh or operator_identity([registry, *among])
    held = None if mesh is None else await _operator(mesh)
    async with _channel(registry, mesh, held) as channel:
        yield channel


async def ask_registry(
    registries: str | Sequence[str],
    ask: Callable[[grpc.aio.Channel], Awaitable[T]],
    mesh: MeshIdentity | None = None,
) -> T:
    """``ask`` the first of ``registries`` (replicas of one registry) that is reached.

    Only UNAVAILABLE (refused, reset, not listening) hands the question to the next:
    any other status is the registry's answer and final (PERMISSION_DENIED is not
    better at another replica). When none is reached, the last UNAVAILABLE is raised.
    The operator is certified once for all of them.
    """
    addresses = parse_registries(registries)
    mesh = mesh or operator_identity(addresses)
    held = None if mesh is None else await _operator(mesh)
    failure: grpc.aio.AioRpcError | None = None
    for address in addresses:
        async with _channel(address, mesh, held) as channel:
            try:
                return await ask(channel)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                failure = exc
    assert failure is not None  # parse_registries gives at least one
    raise failure
