"""``xds.names.HostNames``: registered host names as the IP literals EDS needs, with a
scripted resolver (pure logic; the real one is tested with a real client in
``test_xds``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from registry_service.xds.names import HostNames, system_resolve


class Script:
    """A resolver answering from ``answers`` and counting what it was asked."""

    def __init__(self, **answers: str | None) -> None:
        self.answers = dict(answers)
        self.asked: list[str] = []

    async def __call__(self, host: str) -> str | None:
        self.asked.append(host)
        return self.answers.get(host.replace("-", "_"))


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_ip_literals_pass_and_names_resolve_in_the_background_then_tell() -> None:
    changes: list[int] = []
    script = Script(worker_1="10.0.0.1")
    names = HostNames(lambda: changes.append(1), lambda: ["worker-1"], resolve=script, refresh=60)
    try:
        assert names.address_of("10.9.9.9") == "10.9.9.9"
        assert names.address_of("::1") == "::1"
        assert names.address_of("worker-1") is None  # not yet: asked in the background
        await until(lambda: changes)
        assert changes == [1]
        assert names.address_of("worker-1") == "10.0.0.1"
        assert script.asked == ["worker-1"]  # once, then from the cache
    finally:
        await names.close()


async def test_each_round_follows_a_moved_name_and_forgets_unregistered_ones() -> None:
    changes: list[int] = []
    registered = ["worker-1", "worker-2", "10.0.0.9"]
    script = Script(worker_1="10.0.0.1", worker_2=None)
    names = HostNames(lambda: changes.append(1), lambda: registered, resolve=script, refresh=0.05)
    try:
        names.address_of("worker-1")
        names.address_of("worker-2")
        await until(lambda: len(script.asked) == 2)
        await asyncio.sleep(0.01)
        assert names.address_of("worker-2") is None  # does not resolve: stays out
        script.answers.update(worker_1="10.0.0.7", worker_2="10.0.0.2")
        await until(lambda: names.address_of("worker-2") == "10.0.0.2")
        assert names.address_of("worker-1") == "10.0.0.7"
        assert len(changes) >= 2
        # worker-2's instance goes: it is no longer resolved.
        registered.remove("worker-2")
        await asyncio.sleep(0.12)
        before = script.asked.count("worker-2"), script.asked.count("worker-1")
        await asyncio.sleep(0.12)
        assert script.asked.count("worker-2") == before[0]
        assert script.asked.count("worker-1") > before[1]  # still resolved every round
        assert "10.0.0.9" not in script.asked  # IPs are never resolved
    finally:
        await names.close()


async def test_names_past_the_limit_wait_and_are_not_resolved() -> None:
    script = Script(a="10.0.0.1", b="10.0.0.2", c="10.0.0.3")
    names = HostNames(
        lambda: None, lambda: ["a", "b", "c"], resolve=script, refresh=60, max_names=2
    )
    try:
        for host in ("a", "b", "c"):
            names.address_of(host)
        await until(lambda: len(script.asked) == 2)
        await asyncio.sleep(0.05)
        assert sorted(script.asked) == ["a", "b"]
        assert names.address_of("c") is None
    finally:
        await names.close()


async def test_the_system_resolver_finds_localhost_and_not_a_reserved_name() -> None:
    assert await system_resolve("localhost") in ("127.0.0.1", "::1")
    assert await system_resolve("nothing.invalid") is None
