"""``shoal policy``: set, show and check the mesh's authorization policy at the registry.

The policy file is the one ``identity.authz`` describes (``examples/policy.yaml``
shows one). ``set`` validates it here first, so a mistake is reported with its file,
line and field before anything is sent; the registry validates it again and every
sidecar follows the change within a second.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
import grpc
import yaml

from identity.authz import Decision, Policy, load_policy
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId
from protos import registry_pb2 as pb
from protos import registry_pb2_grpc as pb_grpc
from shoal_cli.errors import UserError
from shoal_cli.operator import ask_registry
from shoal_cli.options import json_option
from shoal_cli.output import emit_json, say
from shoal_cli.registry_ops import registry_option, unreachable
from shoal_core.policy_wire import policy_from_pb, policy_to_pb

if TYPE_CHECKING:
    from protos.registry_pb2_grpc import RegistryAsyncStub

__all__ = ["policy"]

_METHOD_PATH = re.compile(r"/[^/\s]+/[^/\s]+")
# Codes that say the registry could not be reached at all; any other is its answer.
_UNREACHED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _refused(registries: Sequence[str], exc: grpc.aio.AioRpcError) -> UserError:
    if exc.code() in _UNREACHED:
        return unreachable("registry", registries, exc)
    address = ", ".join(registries)
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return UserError(f"registry {address} has no authorization policies (too old?)")
    return UserError(f"registry {address} refused: {exc.details()} ({exc.code().name})")


async def _set(registries: Sequence[str], policy: Policy) -> int:
    async def ask(channel: grpc.aio.Channel) -> pb.SetPolicyResponse:
        stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
        return await stub.SetPolicy(pb.SetPolicyRequest(policy=policy_to_pb(policy)), timeout=5)

    try:
        reply = await ask_registry(registries, ask)
    except grpc.aio.AioRpcError as exc:
        raise _refused(registries, exc) from None
    return reply.version


async def _get(registries: Sequence[str]) -> tuple[int, Policy]:
    async def ask(channel: grpc.aio.Channel) -> pb.Policy:
        stub: RegistryAsyncStub = pb_grpc.RegistryStub(channel)
        return await stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)

    try:
        msg = await ask_registry(registries, ask)
    except grpc.aio.AioRpcError as exc:
        raise _refused(registries, exc) from None
    return msg.version, policy_from_pb(msg, source=f"registry {', '.join(registries)}")


def _summary(policy: Policy) -> str:
    return f"{len(policy.rules)} rules, default {policy.default}"


@click.group()
def policy() -> None:
    """The mesh's service-to-service authorization policy."""


@policy.command("set")
@click.argument("file", type=click.Path(dir_okay=False))
@registry_option()
@json_option()
def set_(file: str, registry: tuple[str, ...], as_json: bool) -> None:
    """Validate FILE and make it the mesh's policy; an mTLS registry takes it only
    from an operator."""
    new = load_policy(file)
    version = asyncio.run(_set(registry, new))
    if as_json:
        emit_json({"version": version, "rules": len(new.rules), "default": new.default})
    else:
        say(f"policy version {version} set: {_summary(new)}")


@policy.command()
@registry_option()
@json_option()
def show(registry: tuple[str, ...], as_json: bool) -> None:
    """Print the mesh's policy as YAML, which 'shoal policy set' takes back."""
    version, current = asyncio.run(_get(registry))
    data = current.to_data()
    if as_json:
        emit_json({"version": version, **data})
        return
    say(f"# policy version {version}: {_summary(current)}")
    # Lists flow on one line ("from: [client]"), so each rule reads as it was written.
    say(yaml.safe_dump(data, sort_keys=False, default_flow_style=None).rstrip("\n"))


def _source(name: str) -> SpiffeId:
    try:
        return SpiffeId.service(DEFAULT_TRUST_DOMAIN, name)
    except SpiffeError as exc:
        raise UserError(f"--from: {exc}") from None


@policy.command()
@click.option("--from", "source", required=True, help="The calling service.")
@click.option("--to", "destination", required=True, help="The called service.")
@click.option("--method", required=True, help="The full method, /pkg.Service/Method.")
@click.option(
    "--file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Check against this policy file instead of the registry's policy.",
)
@registry_option()
@json_option()
def check(
    source: str,
    destination: str,
    method: str,
    file: str | None,
    registry: tuple[str, ...],
    as_json: bool,
) -> int:
    """Say whether a call would be allowed, and by which rule. Exits 0 when allowed,
    1 when denied."""
    if not _METHOD_PATH.fullmatch(method):
        raise UserError(f"--method: {method!r} is not a method path like /pkg.Service/Method")
    caller = _source(source)
    version: int | None = None
    if file is not None:
        current = load_policy(file)
    else:
        version, current = asyncio.run(_get(registry))
    decision: Decision = current.decide(caller, destination, method)
    if as_json:
        out: dict[str, Any] = {
            "from": source,
            "to": destination,
            "method": method,
            "allowed": decision.allowed,
            "reason": decision.reason,
            "version": version,
        }
        emit_json(out)
    else:
        verdict = "allowed" if decision.allowed else "denied"
        say(f"{verdict}: {source} -> {destination} {method}, by {decision.reason}")
    return 0 if decision.allowed else 1
