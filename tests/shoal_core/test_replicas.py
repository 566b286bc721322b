"""Registry replica lists and the one rule for moving between replicas."""

from __future__ import annotations

import pytest

from shoal_core.addresses import AddressError
from shoal_core.replicas import MAX_REPLICAS, Move, Replicas, parse_registries


def test_a_list_keeps_its_order_and_each_replica_once_however_written() -> None:
    assert parse_registries("a:1, b:2,A:1,b:2") == ("a:1", "b:2")
    assert parse_registries(["[::1]:7700", "127.0.0.1:7700"]) == ("[::1]:7700", "127.0.0.1:7700")
    assert parse_registries("127.0.0.1:7700") == ("127.0.0.1:7700",)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a:1,,b:2", "empty entry"),
        ("a:1,", "empty entry"),
        ("", "empty entry"),
        ("a:1,b:99999", "outside 1..65535"),
        ("a:1,b", "must be host:port"),
        ("a:0", "outside 1..65535"),
        (",".join(f"h{i}:1" for i in range(MAX_REPLICAS + 1)), f"at most {MAX_REPLICAS}"),
    ],
)
def test_a_bad_list_is_refused_in_one_line(text: str, says: str) -> None:
    with pytest.raises(AddressError, match=says) as caught:
        parse_registries(text)
    assert "\n" not in str(caught.value)


def test_a_failure_moves_round_robin_and_says_the_first_move_of_an_outage() -> None:
    replicas = Replicas("a:1,b:2,c:3")
    assert replicas.current == "a:1"
    assert replicas.failed("a:1") == Move("a:1", "b:2", first=True)
    assert replicas.failed("b:2") == Move("b:2", "c:3", first=False)
    assert replicas.failed("c:3") == Move("c:3", "a:1", first=False)
    replicas.answered("a:1")
    assert replicas.failed("a:1") == Move("a:1", "b:2", first=True)
    assert replicas.in_turn() == ("b:2", "c:3", "a:1")


def test_a_failure_someone_else_moved_on_from_moves_nothing() -> None:
    replicas = Replicas(["a:1", "b:2"])
    assert replicas.failed("a:1") is not None
    # Another user of the same replicas had its call to a:1 in flight: b:2 stays.
    assert replicas.failed("a:1") is None
    assert replicas.current == "b:2"


def test_a_single_replica_never_moves_and_shared_replicas_stay_shared() -> None:
    one = Replicas("a:1")
    assert one.failed("a:1") is None
    assert one.current == "a:1" and len(one) == 1
    assert Replicas.of(one) is one
    assert Replicas.of("a:1,b:2").addresses == ("a:1", "b:2")
