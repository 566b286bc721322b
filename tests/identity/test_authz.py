"""The authorization policy's rules: validation on load, and first-match evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from identity.authz import MAX_RULES, Policy, load_policy, parse_policy, policy_from_data
from identity.spiffe import SpiffeId
from shoal_core.config import ConfigError
from shoal_core.policy_wire import policy_from_pb, policy_to_pb

TD = "shoal.local"
CLIENT = SpiffeId.service(TD, "client")
MONITOR = SpiffeId.service(TD, "monitor")
ROGUE = SpiffeId.service(TD, "rogue")
WORKER = "/shoal.worker.v1.Worker"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

POLICY = """
default: deny
rules:
  - name: client-worker
    from: [client]
    to: worker
    methods: ["/shoal.worker.v1.Worker/*"]
  - from: ["*"]
    to: "*"
    methods: [/grpc.health.v1.Health/Check]
  - from: [monitor, client]
    to: "*"
    methods: [/shoal.worker.v1.Worker/Stats]
  - name: no-exec
    from: ["*"]
    to: worker
    methods: [/shoal.worker.v1.Worker/Exec]
    action: deny
  - {from: [monitor], to: worker}
"""


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY)


def test_the_first_matching_rule_decides_and_its_reason_names_it(policy: Policy) -> None:
    decide = policy.decide
    assert decide(CLIENT, "worker", f"{WORKER}/Exec").reason == "rule 'client-worker' (allow)"
    assert decide(CLIENT, "worker", f"{WORKER}/Exec").allowed
    # Unnamed rules are named by their place, counting from 1.
    stats = decide(MONITOR, "cache", f"{WORKER}/Stats")
    assert (stats.allowed, stats.reason) == (True, "rule #3 (allow)")
    # The deny rule comes before monitor's catch-all, so it wins for Exec only.
    exec_ = decide(MONITOR, "worker", f"{WORKER}/Exec")
    assert (exec_.allowed, exec_.reason) == (False, "rule 'no-exec' (deny)")
    assert decide(MONITOR, "worker", f"{WORKER}/Call").reason == "rule #5 (allow)"
    # Nothing matches: the default, and the reason says so.
    other = decide(ROGUE, "worker", f"{WORKER}/Call")
    assert (other.allowed, other.reason) == (False, "the mesh default (deny)")


def test_methods_match_exactly_by_service_or_all(policy: Policy) -> None:
    assert policy.decide(CLIENT, "worker", f"{WORKER}/Anything").allowed
    # A service prefix must end at the slash: Worker2 is another service.
    assert not policy.decide(CLIENT, "worker", "/shoal.worker.v1.Worker2/Exec").allowed
    assert policy.decide(ROGUE, "any", "/grpc.health.v1.Health/Check").allowed
    assert not policy.decide(ROGUE, "any", "/grpc.health.v1.Health/Watch").allowed
    everything = policy_from_data({"default": "deny", "rules": [{"from": ["a"], "to": "b"}]})
    assert everything.decide(SpiffeId.service(TD, "a"), "b", "/x.Y/Z").allowed
    assert not everything.decide(SpiffeId.service(TD, "a"), "c", "/x.Y/Z").allowed


def test_callers_that_are_not_a_service_of_the_mesh_match_only_star(policy: Policy) -> None:
    stats = f"{WORKER}/Stats"
    others = [
        None,
        SpiffeId(TD, "operator", "client"),
        SpiffeId(TD, "registry"),
        SpiffeId.service("other.test", "client"),
    ]
    for who in others[:3]:
        assert not policy.decide(who, "worker", stats).allowed, who
        assert policy.decide(who, "worker", "/grpc.health.v1.Health/Check").allowed, who
    foreign = others[3]
    # Without a trust domain to hold it to, the TLS layer has vouched for the caller...
    assert policy.decide(foreign, "worker", stats).allowed
    # ...with one, another trust domain's "client" is not ours.
    assert not policy.decide(foreign, "worker", stats, trust_domain=TD).allowed
    assert policy.decide(CLIENT, "worker", stats, trust_domain=TD).allowed


def test_without_rules_the_default_decides_and_is_allow_unless_set() -> None:
    assert Policy().decide(None, "worker", f"{WORKER}/Exec") == Policy().decide(
        ROGUE, "x", "/a.B/C"
    )
    assert Policy().decide(None, "worker", f"{WORKER}/Exec").reason == "the mesh default (allow)"
    assert not parse_policy("default: deny").decide(CLIENT, "worker", "/a.B/C").allowed


def test_a_denial_names_the_caller_the_call_and_the_rule(policy: Policy) -> None:
    decision = policy.decide(MONITOR, "worker", f"{WORKER}/Exec")
    message = decision.denial(str(MONITOR), "worker", f"{WORKER}/Exec")
    assert message == (
        "spiffe://shoal.local/svc/monitor may not call /shoal.worker.v1.Worker/Exec on "
        "service 'worker': rule 'no-exec' (deny)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default: maybe", "f.yaml: line 1: default: Input should be 'allow' or 'deny'"),
        ("rules:\n  - {from: [a], to: b, method: ['*']}", "line 2: rules.0.method: Extra"),
        ("rules:\n  - {to: b}", "f.yaml: line 2: rules.0.from: Field required"),
        ("rules:\n  - {from: [], to: b}", "rules.0.from: Value error, must name at least one"),
        ("rules:\n  - {from: [a b], to: b}", "rules.0.from.0: Value error, 'a b' is not"),
        ("rules:\n  - {from: [a], to: b/c}", "rules.0.to: Value error, 'b/c' is not '*' or"),
        ("rules:\n  - {from: [a], to: b, methods: [Exec]}", "rules.0.methods.0: Value error"),
        ("rules:\n  - {from: [a], to: b, methods: ['/a.B/*x']}", "rules.0.methods.0: Value"),
        ("rules:\n  - {from: [a], to: b, methods: ['/a.B']}", "rules.0.methods.0: Value"),
        ("rules:\n  - {from: [a], to: b, action: block}", "rules.0.action: Input should be"),
        ("rules:\n  - {name: 'x y', from: [a], to: b}", "rules.0.name: Value error"),
        (
            "rules:\n  - {name: r, from: [a], to: b}\n  - {name: r, from: [a], to: c}",
            "line 1: rules: Value error, rules #1 and #2 are both named 'r'",
        ),
        ("rules: [", "f.yaml: line 1: not valid YAML"),
        ("- a", "f.yaml: line 1: the top level must be a mapping"),
    ],
)
def test_a_bad_file_is_refused_with_one_line_naming_file_line_and_field(
    text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, source="f.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message, message


def test_the_bounds_hold() -> None:
    rule = {"from": ["a"], "to": "b"}
    policy_from_data({"rules": [rule] * MAX_RULES})
    with pytest.raises(ConfigError, match="rules: Tuple should have at most 1000 items"):
        policy_from_data({"rules": [rule] * (MAX_RULES + 1)})
    with pytest.raises(ConfigError, match=r"rules.0.from: Tuple should have at most 64"):
        policy_from_data({"rules": [{"from": ["a"] * 65, "to": "b"}]})
    with pytest.raises(ConfigError, match=r"rules.0.to: Value error"):
        policy_from_data({"rules": [{"from": ["a"], "to": "b" * 129}]})


def test_the_wire_form_and_the_file_form_hold_the_same_policy(policy: Policy) -> None:
    msg = policy_to_pb(policy, version=7)
    assert msg.version == 7 and list(msg.rules[0].sources) == ["client"]
    assert policy_from_pb(msg) == policy
    assert parse_policy(str(policy.to_data()).replace("'", '"')) == policy
    # Empty wire fields are the defaults, as missing keys are in a file.
    bare = policy_from_pb(policy_to_pb(policy_from_data({"rules": [{"from": ["a"], "to": "b"}]})))
    assert bare.default == "allow" and bare.rules[0].methods == ("*",)
    assert bare.rules[0].action == "allow"


def test_the_example_policies_load_and_let_only_client_run_work_on_workers() -> None:
    files = sorted(EXAMPLES.glob("*policy*.yaml"))
    assert files, "no example policy"
    for file in files:
        load_policy(file)
    example = load_policy(EXAMPLES / "policy.yaml")
    assert example.default == "deny"
    for method in ("Exec", "ExecStream", "Call", "CallStream"):
        path = f"{WORKER}/{method}"
        assert example.decide(CLIENT, "worker", path).allowed, method
        for who in (MONITOR, ROGUE, None):
            assert not example.decide(who, "worker", path).allowed, (who, method)
    assert example.decide(CLIENT, "worker", f"{WORKER}/Echo").allowed
    assert example.decide(MONITOR, "worker", f"{WORKER}/Stats").allowed
    assert not example.decide(ROGUE, "worker", f"{WORKER}/Stats").allowed
    for who in (CLIENT, ROGUE, None):
        for path in (
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ):
            assert example.decide(who, "registry", path).allowed, (who, path)
