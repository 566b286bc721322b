"""Which service may call which methods of which other service (no gRPC here).

A ``Policy`` is the mesh's one set of authorization rules, kept by the registry and
enforced by each inbound sidecar from the caller's certificate::

    default: deny
    rules:
      - {name: client-worker, from: [client], to: worker, methods: ["/shoal.worker.v1.Worker/*"]}
      - {from: ["*"], to: "*", methods: ["/grpc.health.v1.Health/*"]}

Evaluation (``Policy.decide``): the rules are tried in order and the first that
matches the call decides it; when none does, ``default`` does. A rule matches when
the source, the destination and the method all match:

- ``from``: service names, or ``"*"`` for any caller at all. A name matches a caller
  whose SPIFFE ID is ``svc/<name>`` of the mesh's trust domain. Any other caller (no
  certificate, another trust domain, an operator, the registry) has no service name to
  match, so only ``"*"`` matches it: a rule can grant such callers nothing narrower
  than "everyone".
- ``to``: the service the call arrives at (the inbound sidecar's own), or ``"*"``.
- ``methods``: ``"/pkg.Service/Method"`` exactly, ``"/pkg.Service/*"`` for every method
  of that service, or ``"*"`` (the default) for every method.

``Decision.reason`` names what decided: ``rule 'NAME' (allow)``, ``rule #N (deny)``
for an unnamed rule (1-based), or ``the mesh default (deny)``. Without any policy the
mesh allows everything, as it did before policies existed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, Field

from identity.spiffe import SpiffeId
from shoal_core.config import ConfigError, StrictModel, load_yaml, parse_yaml

__all__ = [
    "ANY",
    "Decision",
    "Policy",
    "Rule",
    "load_policy",
    "parse_policy",
    "policy_from_data",
    "source_label",
]

ANY = "*"
MAX_RULES = 1000
MAX_ENTRIES = 64
MAX_NAME = 128
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_GRPC_SERVICE = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_METHOD = re.compile(rf"/({_GRPC_SERVICE})/([A-Za-z_][A-Za-z0-9_]*|\*)")
_MAX_METHOD = 2 * 256 + 2

Action = Literal["allow", "deny"]


def _service(value: str) -> str:
    if value != ANY and not (len(value) <= MAX_NAME and _SERVICE.fullmatch(value)):
        raise ValueError(f"{value!r} is not '*' or a service name like worker")
    return value


def _method(value: str) -> str:
    if value != ANY and not (len(value) <= _MAX_METHOD and _METHOD.fullmatch(value)):
        raise ValueError(
            f"{value!r} is not '*', /pkg.Service/Method or /pkg.Service/* "
            "(e.g. /shoal.worker.v1.Worker/Exec)"
        )
    return value


def _rule_name(value: str) -> str:
    if value and not (len(value) <= MAX_NAME and _RULE_NAME.fullmatch(value)):
        raise ValueError(f"{value!r} must be letters, digits, '.', '-' or '_' (at most 128)")
    return value


def _non_empty(value: tuple[str, ...]) -> tuple[str, ...]:
    # Checked after the items (not with min_length), so a list whose one item is wrong
    # gets that one error, not a second saying the list is empty.
    if not value:
        raise ValueError("must name at least one entry")
    return value


ServiceName = Annotated[str, AfterValidator(_service)]
MethodPattern = Annotated[str, AfterValidator(_method)]
Sources = Annotated[
    tuple[ServiceName, ...], Field(max_length=MAX_ENTRIES), AfterValidator(_non_empty)
]
Methods = Annotated[
    tuple[MethodPattern, ...], Field(max_length=MAX_ENTRIES), AfterValidator(_non_empty)
]


class Rule(StrictModel):
    """One rule: calls ``from`` these services ``to`` that one, for these ``methods``."""

    name: Annotated[str, AfterValidator(_rule_name)] = ""
    from_: Sources = Field(alias="from")
    to: ServiceName
    methods: Methods = (ANY,)
    action: Action = "allow"

    _any_source: bool = pydantic.PrivateAttr(False)
    _sources: frozenset[str] = pydantic.PrivateAttr(frozenset())
    _any_method: bool = pydantic.PrivateAttr(False)
    _exact: frozenset[str] = pydantic.PrivateAttr(frozenset())
    _prefixes: tuple[str, ...] = pydantic.PrivateAttr(())

    def model_post_init(self, context: Any, /) -> None:
        # Matching is on every inbound call: sets and prefixes are worked out once here.
        methods = set(self.methods)
        self._any_source = ANY in self.from_
        self._sources = frozenset(self.from_)
        self._any_method = ANY in methods
        self._exact = frozenset(m for m in methods if not m.endswith("/*"))
        self._prefixes = tuple(m[:-1] for m in methods if m.endswith("/*"))

    def matches_source(self, service: str | None) -> bool:
        """``service``: the caller's service name, None for a caller with none."""
        return self._any_source or (service is not None and service in self._sources)

    def matches_method(self, method: str) -> bool:
        return (
            self._any_method
            or method in self._exact
            or any(method.startswith(p) for p in self._prefixes)
        )


class Policy(StrictModel):
    """The mesh's rules, first match wins, and the ``default`` when none matches."""

    default: Action = "allow"
    rules: tuple[Rule, ...] = Field(default=(), max_length=MAX_RULES)

    _by_destination: dict[str, tuple[tuple[str, Rule], ...]] = pydantic.PrivateAttr(
        default_factory=dict
    )
    _default: Decision = pydantic.PrivateAttr()

    @pydantic.field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        # A reason names its rule: two rules of one name would make it ambiguous.
        seen: dict[str, int] = {}
        for n, rule in enumerate(rules, 1):
            if rule.name in seen:
                raise ValueError(f"rules #{seen[rule.name]} and #{n} are both named {rule.name!r}")
            if rule.name:
                seen[rule.name] = n
        return rules

    def model_post_init(self, context: Any, /) -> None:
        self._default = Decision(self.default == "allow", f"the mesh default ({self.default})")

    def _candidates(self, destination: str) -> tuple[tuple[str, Rule], ...]:
        """The rules that can apply at ``destination``, in order, each with its label."""
        found = self._by_destination.get(destination)
        if found is None:
            found = tuple(
                (f"rule '{r.name}'" if r.name else f"rule #{n}", r)
                for n, r in enumerate(self.rules, 1)
                if r.to in (ANY, destination)
            )
            # Destinations are the services this sidecar serves: a handful, so no bound
            # is needed beyond the one this guards against (any caller-chosen string).
            if len(self._by_destination) < 64:
                self._by_destination[destination] = found
        return found

    def decide(
        self,
        source: SpiffeId | None,
        destination: str,
        method: str,
        *,
        trust_domain: str | None = None,
    ) -> Decision:
        """Whether ``source`` may call ``method`` on service ``destination``, and why.

        ``trust_domain``: the mesh's; a source of any other one is matched as a caller
        without identity. None leaves that to the TLS layer, which accepts only
        certificates of the mesh's CA.
        """
        service = None
        if source is not None and source.kind == "svc":
            if trust_domain is None or source.trust_domain == trust_domain:
                service = source.name
        for label, rule in self._candidates(destination):
            if rule.matches_source(service) and rule.matches_method(method):
                return Decision(rule.action == "allow", f"{label} ({rule.action})")
        return self._default

    def to_data(self) -> dict[str, Any]:
        """The policy as a file would hold it (``from``, not ``from_``)."""
        return self.model_dump(by_alias=True, mode="json")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``Policy.decide``; ``reason`` names the rule or the default."""

    allowed: bool
    reason: str

    def denial(self, source: str, destination: str, method: str) -> str:
        """The PERMISSION_DENIED message for a denied call (``source_label`` gives the
        first argument)."""
        return f"{source} may not call {method} on service {destination!r}: {self.reason}"


def source_label(source: SpiffeId | None) -> str:
    """How messages and metrics name a caller."""
    return "a caller without a mesh identity" if source is None else str(source)


def policy_from_data(data: Mapping[str, Any], *, source: str = "policy") -> Policy:
    """Validate plain data (from the wire, say); ``ConfigError`` names each field."""
    try:
        return Policy.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{field}: {err['msg']}")
        raise ConfigError(source, problems) from None


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """A policy from YAML text; ``ConfigError`` names the source, line and field."""
    return parse_yaml(text, Policy, source=source)


def load_policy(path: str | Path) -> Policy:
    """A policy from a YAML file; ``ConfigError`` names the file, line and field."""
    return load_yaml(path, Policy)
