"""The TLS part: what mTLS costs the sidecar per call, against nginx with TLS, and
how many new mTLS connections a second the mesh hop takes.

Per call: h2load Echo under load through each two-proxy stack (``tlsstacks``), rounds
taking the stacks in turn; CPU is both proxies' (every process of the stack). The
ratios are medians of each round's ratio, like the other parts'. Handshakes: rounds of
fresh connections with a client certificate to the mesh hop's TLS listener of the mTLS
sidecars and of nginx (``handshakes``).
"""

from __future__ import annotations

import os
import ssl
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .h2load import h2load, rounds
from .handshakes import HandshakeRun, client_context, handshakes
from .measure import Meter, Run
from .report import Verdict, by_round, failures, fmt, median, per_round, table, thread_shares
from .tlsstacks import MTLS, NGINX_TLS, SIDECAR, TlsStacks

__all__ = ["CPU_OVER_PLAIN", "TlsPlan", "tls_part"]

# The targets: mTLS at most 1.15x the plaintext sidecar's CPU per call, and no
# more than nginx with TLS on both sides.
CPU_OVER_PLAIN = 1.15
CPU_OVER_NGINX = 1.0


@dataclass
class TlsPlan:
    """How much load and how many new connections each round puts on each stack."""

    rounds: int
    calls: int
    conns: int
    streams: int
    handshake_rounds: int
    handshakes: int
    threads: int


def _ratios(load: dict[str, list[Run]], name: str, base: str) -> list[float]:
    """Each round's CPU per call of ``name`` over ``base``'s in the same round."""
    return [
        a.cpu_us / b.cpu_us
        for a, b in zip(load[name], load[base], strict=True)
        if a.cpu_us is not None and b.cpu_us
    ]


def _pooled(runs: list[Run], calls: int) -> float | None:
    """CPU per call over all of a stack's rounds at once: total CPU over total calls."""
    spent = [r.spent.cpu for r in runs if r.spent is not None]
    return sum(spent) / (len(spent) * calls) * 1e6 if spent else None


def _mid(values: list[float]) -> float:
    return statistics.median(values) if values else float("inf")


async def _per_call(
    exe: str, stacks: TlsStacks, frame: Path, plan: TlsPlan
) -> tuple[dict[str, list[Run]], dict[str, float]]:
    """The load rounds, and each sidecar's own CPU per call over all of them."""
    targets = stacks.targets
    for t in targets.values():  # connections, pools, caches; not counted
        await h2load(exe, t.address, frame, calls=min(2000, plan.calls), conns=plan.conns,
                     streams=plan.streams)  # fmt: skip
    each = {
        f"{stack} {side}": Meter([child.pid])
        for stack in (SIDECAR, MTLS)
        for side, child in zip(("client side", "worker side"), stacks.procs[stack], strict=True)
    }
    before = {name: meter.usage() for name, meter in each.items()}
    load = await rounds(exe, targets, frame, plan.rounds, plan.calls, plan.conns, plan.streams)
    total = plan.rounds * plan.calls
    own = {name: (m.usage() - before[name]).cpu / total * 1e6 for name, m in each.items()}
    return load, own


def _print_load(load: dict[str, list[Run]], own: dict[str, float], plan: TlsPlan) -> None:
    print(
        f"\n== TLS, per call: h2load Echo (64 bytes) through two proxies in a row, "
        f"{plan.conns} conns x {plan.streams} streams, {plan.calls} calls a run, median of "
        f"{plan.rounds} rounds; CPU is both proxies' together (nginx: masters + workers)"
    )
    plain, nginx_tls = _ratios(load, MTLS, SIDECAR), _ratios(load, MTLS, NGINX_TLS)
    rows = []
    for name, runs in load.items():
        to_plain, to_nginx = _ratios(load, name, SIDECAR), _ratios(load, name, NGINX_TLS)
        proxy = name != "direct"
        rows.append([
            name, fmt(median(runs, lambda r: r.rate), ".0f"),
            fmt(median(runs, lambda r: r.cpu_us), ".1f"), fmt(_pooled(runs, plan.calls), ".1f"),
            fmt(statistics.median(to_plain) if proxy and to_plain else None, ".2f"),
            fmt(statistics.median(to_nginx) if proxy and to_nginx else None, ".2f"),
            fmt(median(runs, lambda r: r.switches), ".2f"),
            fmt(median(runs, lambda r: r.p50_ms), ".3f"),
            fmt(median(runs, lambda r: r.p99_ms), ".3f"),
        ])  # fmt: skip
    table(["stack", "req/s", "CPU us/call", "all rounds", "x sidecar", "x nginx TLS",
           "cs/call", "p50 ms", "p99 ms"], rows)  # fmt: skip
    pooled = {n: _pooled(load[n], plan.calls) or 0.0 for n in (SIDECAR, MTLS, NGINX_TLS)}
    print(
        "  'all rounds' = total CPU over total calls, a second estimate beside the median; "
        f"by it, mTLS sidecars x plaintext {pooled[MTLS] / (pooled[SIDECAR] or 1):.2f}, "
        f"x nginx TLS {pooled[MTLS] / (pooled[NGINX_TLS] or 1):.2f}"
    )
    print(by_round("CPU us/call", per_round(load, lambda r: r.cpu_us)))
    print(
        f"  mTLS sidecars' CPU/call by round: x plaintext sidecars "
        f"{' '.join(f'{v:.2f}' for v in plain)}; x nginx TLS "
        f"{' '.join(f'{v:.2f}' for v in nginx_tls)}"
    )
    print("  each sidecar over all rounds: " + ", ".join(
        f"{name} {us:.1f} us/call" for name, us in own.items()))  # fmt: skip
    for name in (SIDECAR, MTLS):
        print(f"  {name} CPU by thread (both processes): {thread_shares(load[name])}")


async def _handshake_rounds(
    ctx: ssl.SSLContext, stacks: TlsStacks, plan: TlsPlan
) -> dict[str, list[HandshakeRun]]:
    for port in stacks.ports.values():  # the first connections load code and fill caches
        await handshakes(ctx, port, 50, plan.threads, measured=False)
    runs: dict[str, list[HandshakeRun]] = {name: [] for name in stacks.ports}
    for _ in range(plan.handshake_rounds):
        for name, port in stacks.ports.items():
            runs[name].append(await handshakes(ctx, port, plan.handshakes, plan.threads))
    return runs


def _hs_median(runs: list[HandshakeRun], figure: Callable[[HandshakeRun], float | None]) -> float:
    values = [v for v in map(figure, runs) if v is not None]
    return statistics.median(values) if values else 0.0


def _print_handshakes(runs: dict[str, list[HandshakeRun]], plan: TlsPlan) -> None:
    print(
        f"\n== TLS, new connections: {plan.handshakes} fresh mTLS connections a run to the "
        f"mesh hop's listener (TLS 1.3 handshake with a client certificate, no resumption, "
        f"then the HTTP/2 preface up to the server's SETTINGS), {plan.threads} client "
        f"threads, median of {plan.handshake_rounds} rounds; server CPU is the listening "
        "proxy's alone"
    )
    rows = [
        [name, f"{_hs_median(rs, lambda r: r.rate):.0f}",
         f"{_hs_median(rs, lambda r: r.server_us):.0f}",
         f"{1e6 / (_hs_median(rs, lambda r: r.server_us) or float('inf')):.0f}",
         f"{100 * _hs_median(rs, lambda r: r.server_busy):.0f}%",
         f"{_hs_median(rs, lambda r: r.client_us):.0f}", str(sum(r.failed for r in rs))]
        for name, rs in runs.items()
    ]  # fmt: skip
    table(["listener", "handshakes/s", "server CPU us each", "per server core-s",
           "server busy", "client CPU us each", "failed"], rows)  # fmt: skip
    print("  handshakes/s by round: " + "; ".join(
        f"{n} " + " ".join(f"{r.rate:.0f}" for r in rs) for n, rs in runs.items()))  # fmt: skip
    print(
        "  the client (Python's ssl, OpenSSL, in this process) shares the machine's cores "
        "with the server: where the server is busy well under 100% of a core, the client "
        "limited the rate, and 'per server core-s' (1 s / server CPU each) is what one core "
        "of the server's would take"
    )
    for name, rs in runs.items():
        for r in rs:
            if r.note:
                print(f"  {name}: {r.note}")


async def tls_part(
    exe: str, stacks: TlsStacks, frame: Path, plan: TlsPlan
) -> tuple[list[Verdict], list[str]]:
    """The TLS part: (verdicts, failures)."""
    before = os.getloadavg()[0]
    load, own = await _per_call(exe, stacks, frame, plan)
    hs = await _handshake_rounds(client_context(stacks.client), stacks, plan)
    _print_load(load, own, plan)
    _print_handshakes(hs, plan)
    print(
        f"  load average (1 min) {before:.1f} at the start of the part, "
        f"{os.getloadavg()[0]:.1f} at its end; {os.cpu_count()} CPUs"
    )
    cpu = {n: median(load[n], lambda r: r.cpu_us) or 0.0 for n in (SIDECAR, MTLS, NGINX_TLS)}
    pooled = {n: _pooled(load[n], plan.calls) or 0.0 for n in (SIDECAR, MTLS, NGINX_TLS)}
    plain, nginx_tls = _mid(_ratios(load, MTLS, SIDECAR)), _mid(_ratios(load, MTLS, NGINX_TLS))
    rate = {n: _hs_median(rs, lambda r: r.rate) for n, rs in hs.items()}
    each = {n: _hs_median(rs, lambda r: r.server_us) for n, rs in hs.items()}
    hs_failed = [f"{n} handshakes ({r.note})" for n, rs in hs.items() for r in rs if r.failed]
    verdicts = [
        Verdict(
            f"TLS CPU/call: mTLS sidecars / plaintext sidecars {plain:.3f} <= {CPU_OVER_PLAIN} "
            f"(median of per-round ratios; medians {cpu[MTLS]:.1f} vs {cpu[SIDECAR]:.1f} us; "
            f"all rounds {pooled[MTLS] / (pooled[SIDECAR] or 1):.2f})",
            plain <= CPU_OVER_PLAIN,
        ),
        Verdict(
            f"TLS CPU/call: mTLS sidecars / nginx x2 TLS {nginx_tls:.3f} <= {CPU_OVER_NGINX:.2f} "
            f"(medians {cpu[MTLS]:.1f} vs {cpu[NGINX_TLS]:.1f} us; "
            f"all rounds {pooled[MTLS] / (pooled[NGINX_TLS] or 1):.2f})",
            nginx_tls <= CPU_OVER_NGINX,
        ),
        Verdict(
            f"new mTLS connections reported for both: mTLS sidecar {rate[MTLS]:.0f}/s "
            f"({each[MTLS]:.0f} us server CPU each), nginx TLS {rate[NGINX_TLS]:.0f}/s "
            f"({each[NGINX_TLS]:.0f} us each); server CPU each, sidecar / nginx "
            f"{each[MTLS] / (each[NGINX_TLS] or float('inf')):.2f}",
            all(rate.values()) and not hs_failed,
        ),
    ]
    return verdicts, failures(load) + hs_failed
