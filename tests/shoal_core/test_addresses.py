"""Address parsing: every flag and registration goes through it."""

from __future__ import annotations

import pytest

from shoal_core.addresses import AddressError, HostPort, parse_address


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:80", HostPort("127.0.0.1", 80)),
        ("localhost:65535", HostPort("localhost", 65535)),
        ("worker-1.mesh.local:7000", HostPort("worker-1.mesh.local", 7000)),
        ("[::1]:8080", HostPort("::1", 8080)),
    ],
)
def test_valid(text: str, expected: HostPort) -> None:
    assert parse_address(text) == expected
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "80",
        ":80",
        "host:",
        "host:0",
        "host:65536",
        "host:-1",
        "host:eighty",
        "::1:80",
        "[::1]80",
        "[nope]:80",
        "-bad-:80",
        "under_score:80",
        "a" * 300 + ":1",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)


def test_port_zero_only_for_listening() -> None:
    assert parse_address("127.0.0.1:0", allow_port_zero=True).port == 0
    with pytest.raises(AddressError, match="outside 1..65535"):
        parse_address("127.0.0.1:0")
