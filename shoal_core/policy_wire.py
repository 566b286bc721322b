"""The authorization policy (``identity.authz``) to and from its registry messages.

Shared by the three parties to the policy (the registry that holds it, the sidecars
that enforce it, the CLI that sets it), which import no service package of each
other. Empty wire fields mean their defaults (``action`` allow, ``methods`` all), as
they do in a file; every value is validated as a file's would be.
"""

from __future__ import annotations

from typing import Any

from identity.authz import Policy, policy_from_data
from protos import registry_pb2 as pb

__all__ = ["policy_from_pb", "policy_to_pb"]


def policy_to_pb(policy: Policy, version: int = 0) -> pb.Policy:
    msg = pb.Policy(default_action=policy.default, version=version)
    for rule in policy.rules:
        msg.rules.add(
            name=rule.name,
            sources=rule.from_,
            to=rule.to,
            methods=rule.methods,
            action=rule.action,
        )
    return msg


def policy_from_pb(msg: pb.Policy, *, source: str = "policy") -> Policy:
    """The policy in ``msg``; ``ConfigError`` names each invalid field."""
    rules: list[dict[str, Any]] = []
    for rule in msg.rules:
        data: dict[str, Any] = {"name": rule.name, "from": list(rule.sources), "to": rule.to}
        if rule.methods:
            data["methods"] = list(rule.methods)
        if rule.action:
            data["action"] = rule.action
        rules.append(data)
    return policy_from_data(
        {"default": msg.default_action or "allow", "rules": rules}, source=source
    )
