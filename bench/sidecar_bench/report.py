"""Medians over rounds, tables, and the met / not met lines."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .measure import Run, Usage

__all__ = [
    "Verdict", "added", "by_round", "failures", "fmt", "median", "per_round", "ratios",
    "relative_line", "round_ratios", "table", "thread_shares", "to_cheaper",
]  # fmt: skip


@dataclass
class Verdict:
    """One target of the issues and whether this run met it."""

    text: str
    met: bool

    def line(self) -> str:
        return f"{'MET    ' if self.met else 'NOT MET'}  {self.text}"


def median(runs: Sequence[Run], figure: Callable[[Run], float | None]) -> float | None:
    """The median of one figure over a target's rounds; ``None`` if it does not apply."""
    values = [v for v in map(figure, runs) if v is not None]
    return statistics.median(values) if values else None


def ratios(runs: dict[str, list[Run]], base: str = "direct") -> dict[str, float]:
    """Each target's median of its per-round rate ratio to ``base`` in the same round.

    A ratio of runs made moments apart cancels most of the machine's drift between rounds.
    """
    return {name: statistics.median(rs) for name, rs in round_ratios(runs, base).items()}


def to_cheaper(
    runs: dict[str, list[Run]], figure: Callable[[Run], float | None], name: str = "sidecar"
) -> list[float]:
    """Each round's ``figure`` of ``name`` over the cheaper of nginx's and HAProxy's."""
    out = []
    for own, *others in zip(runs[name], runs["nginx"], runs["haproxy"], strict=True):
        values = [figure(r) for r in others]
        mine = figure(own)
        cheaper = min((v for v in values if v is not None), default=None)
        if mine is not None and cheaper:
            out.append(mine / cheaper)
    return out


def relative_line(relative: list[float], unit: str) -> str:
    """The per-round sidecar / cheaper ratios and their median, as one printed line."""
    rounds = " ".join(f"{v:.2f}" for v in relative)
    mid = f" (median {statistics.median(relative):.2f})" if relative else ""
    return f"  sidecar CPU/{unit} / the cheaper of nginx and HAProxy, by round: {rounds}{mid}"


def added(runs: dict[str, list[Run]], name: str, base: str = "direct") -> float:
    """The median of the per-round p50 differences between ``name`` and ``base``."""
    return statistics.median(
        r.p50_ms - b.p50_ms for r, b in zip(runs[name], runs[base], strict=True)
    )


def by_round(label: str, values: Mapping[str, Sequence[float | None]], spec: str = ".1f") -> str:
    """``label by round: sidecar 1.0 2.0; nginx ...``."""
    parts = [f"{name} " + " ".join(fmt(v, spec) for v in vs) for name, vs in values.items()]
    return f"  {label} by round: " + "; ".join(parts)


def per_round(
    runs: dict[str, list[Run]], figure: Callable[[Run], float | None]
) -> dict[str, list[float | None]]:
    """One figure of each proxy's rounds (not direct's), in round order."""
    return {name: [figure(r) for r in rs] for name, rs in runs.items() if name != "direct"}


def round_ratios(runs: dict[str, list[Run]], base: str = "direct") -> dict[str, list[float]]:
    """Each round's rate ratio to ``base``'s rate in the same round."""
    return {
        name: [r.rate / b.rate if b.rate else 0.0 for r, b in zip(rs, runs[base], strict=True)]
        for name, rs in runs.items()
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> None:
    """Print rows under headers: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  " + "  ".join(cells))


def failures(runs: dict[str, list[Run]]) -> list[str]:
    """``target (note)`` for every failed run: gRPC errors or missing bytes."""
    return [f"{name} ({r.note})" for name, rs in runs.items() for r in rs if not r.ok]


def thread_shares(runs: list[Run]) -> str:
    """Each thread's share of the process's CPU over ``runs``, by thread name."""
    total = Usage(0.0, 0)
    for run in runs:
        if run.spent is not None:
            total = total + run.spent
    spent = sum(total.by_thread.values()) or 1.0
    top = sorted(total.by_thread.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {100 * sec / spent:.0f}%" for name, sec in top if sec > 0.01 * spent)
