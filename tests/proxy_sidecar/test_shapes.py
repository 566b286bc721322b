"""Publishing and merging method shapes (pure logic): the registry's limits, safe subsets."""

from __future__ import annotations

from proxy_sidecar.config import SidecarConfig
from proxy_sidecar.endpoints import EndpointTable, InstanceInfo
from proxy_sidecar.routing import Router, parse_method
from proxy_sidecar.shapes import MAX_KEYS, MAX_VALUE, merge_unary, publish_unary, read_unary


def test_publish_and_read_round_trip():
    entries, dropped = publish_unary({"a.S": ("Get", "Put"), "b.T": ()})
    assert entries == {"shoal.unary/a.S": "Get,Put", "shoal.unary/b.T": ""}
    assert dropped == []
    # An empty value still says "no unary method", unlike a missing key ("unknown").
    assert read_unary({**entries, "zone-note": "x"}) == {
        "a.S": frozenset({"Get", "Put"}),
        "b.T": frozenset(),
    }


def test_publish_respects_the_registry_limits():
    long_service = "p." + "S" * 120
    many = {f"s{i}.S": ("M",) for i in range(MAX_KEYS)}
    entries, dropped = publish_unary(
        {long_service: ("M",), **many}, taken=["owner", "shoal.unary/s0.S"]
    )
    assert long_service in dropped and "s0.S" in dropped
    assert len(entries) == MAX_KEYS - 2
    assert all(len(k) <= 128 for k in entries)

    methods = [f"Method{i:04d}" for i in range(200)]
    entries, dropped = publish_unary({"a.S": methods})
    value = entries["shoal.unary/a.S"]
    assert len(value) <= MAX_VALUE
    # Cut at a whole name: what is listed is still true, the rest takes the stream path.
    assert set(value.split(",")) < set(methods)
    assert dropped == ["a.S (some methods)"]


def test_merge_needs_every_speaker_to_agree_and_ignores_the_silent():
    merged = merge_unary(
        [
            {"a.S": frozenset({"Get", "Put"})},
            {"a.S": frozenset({"Get"}), "b.T": frozenset({"X"})},
            {},
        ]
    )
    assert merged == {"a.S": frozenset({"Get"}), "b.T": frozenset({"X"})}


def test_table_and_router_follow_shape_changes():
    table = EndpointTable(empty_hold=0.0)
    router = Router(table, SidecarConfig(), app="127.0.0.1:1")
    route = parse_method("/a.S/Get")
    assert route is not None
    assert not router.is_unary(route)
    version = router.shapes_version
    table.replace([InstanceInfo("i1", "h:1", ("a.S",), unary={"a.S": frozenset({"Get"})})])
    assert router.is_unary(route) and router.shapes_version != version
    version = router.shapes_version
    # A new instance that disagrees takes the method off the fast path.
    table.upsert(InstanceInfo("i2", "h:2", ("a.S",), unary={"a.S": frozenset()}))
    assert not router.is_unary(route) and router.shapes_version != version
    # The local app's own reflection counts too (it serves the calls delivered here).
    version = router.shapes_version
    router.set_local_unary({"a.S": ["Get"]})
    assert router.is_unary(route) and router.shapes_version != version
