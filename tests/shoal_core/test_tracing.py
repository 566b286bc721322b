"""W3C trace context as the hops read and write it, and head sampling (pure logic)."""

from __future__ import annotations

import random

import pytest

from shoal_core.tracing import TraceContext, TraceSettings, parse_traceparent

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def test_a_traceparent_is_read_and_written_back_the_same():
    value = f"00-{TRACE}-{SPAN}-01"
    context = parse_traceparent(value)
    assert context == TraceContext(int(TRACE, 16), int(SPAN, 16), True)
    assert context.traceparent() == value
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == TraceContext(
        int(TRACE, 16), int(SPAN, 16), False
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",
    ],
)
def test_a_traceparent_that_cannot_be_continued_is_ignored(value: str):
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_by_its_first_four_fields():
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-comes-next") == TraceContext(
        int(TRACE, 16), int(SPAN, 16), True
    )


def test_sampling_keeps_about_the_share_asked_and_decides_by_trace_id_alone():
    settings = TraceSettings(endpoint="http://127.0.0.1:4317", service="s", sample=0.25)
    rng = random.Random(7)
    ids = [rng.getrandbits(128) for _ in range(20_000)]
    kept = sum(settings.keeps(i) for i in ids)
    assert 0.23 < kept / len(ids) < 0.27
    assert all(settings.keeps(i) == settings.keeps(i) for i in ids[:100])
    everything = TraceSettings(endpoint="http://x:1", service="s", sample=1.0)
    nothing = TraceSettings(endpoint="http://x:1", service="s", sample=0.0)
    assert all(everything.keeps(i) for i in ids) and not any(nothing.keeps(i) for i in ids)


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"sample": 1.5}, "between 0 and 1"),
        ({"endpoint": "127.0.0.1:4317"}, "http://HOST:PORT"),
        ({"service": ""}, "service name"),
    ],
)
def test_bad_trace_settings_are_refused_with_the_reason(fields: dict[str, object], complaint: str):
    values: dict[str, object] = {"endpoint": "http://127.0.0.1:4317", "service": "s", **fields}
    with pytest.raises(ValueError, match=complaint):
        TraceSettings(**values)  # type: ignore[arg-type]
