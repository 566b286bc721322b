"""What `bench.registry_bench` measured, and its report: one `Result` per store and
size, printed as two tables and the targets."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from bench import registry_etcd as stores
from shoal_cli.loadgen import percentile

__all__ = ["PER_SERVICE", "TTL_MS", "Result", "report"]

PER_SERVICE = 50
TTL_MS = 10_000


@dataclass
class Result:
    store: str
    size: int
    register_s: float
    wanted_hb_s: float
    sustained_hb_s: float
    lapsed: int
    discover_p50_ms: float
    discover_p99_ms: float
    discover_calls: int
    discover_empty: int
    capacity_hb_s: float
    lapses_counted: int
    etcd: stores.EtcdRates | None
    propagation: stores.Propagation


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.1f}ms" if values else "-"


def report(args: argparse.Namespace, results: list[Result], failed: list[str]) -> None:
    print(
        f"registry benchmark: TTL {TTL_MS / 1000:g}s, heartbeat every TTL/3 (with a load "
        f"report that {'changes every time' if args.load == 'changing' else 'stays the same'}), "
        f"{PER_SERVICE} instances per service, "
        f"{args.seconds:g}s per size, {os.cpu_count()} cores shared by etcd, the registries "
        f"and the load generator; etcd: 3 members, 2 registry replicas, instances half each"
    )
    print(
        f"{'store':>6} {'instances':>9} {'reg/s':>6} {'hb/s wanted':>11} "
        f"{'hb/s sustained':>14} {'lapsed':>6} {'lapses':>6} {'discover p50':>12} {'p99':>8} "
        f"{'calls':>6} {'empty':>5} {'hb/s capacity':>13}"
    )
    for r in results:
        print(
            f"{r.store:>6} {r.size:>9} {r.register_s:>6.0f} {r.wanted_hb_s:>11.0f} "
            f"{r.sustained_hb_s:>14.0f} {r.lapsed:>6} {r.lapses_counted:>6} "
            f"{r.discover_p50_ms:>10.2f}ms {r.discover_p99_ms:>6.2f}ms {r.discover_calls:>6} "
            f"{r.discover_empty:>5} {r.capacity_hb_s:>13.0f}"
        )
    print(
        "(reg/s: Register calls/s while the instances register, 128 at a time, each "
        "heartbeating from its Register on; lapsed: instances not healthy after the phase, "
        "plus heartbeats refused; empty: Discover answers with no instance; "
        "lapses: shoal_registry_lapses_total delta over the replicas)"
    )
    print()
    print(
        f"{'store':>6} {'instances':>9} {'etcd writes/s':>13} {'txns/s':>7} {'proposals/s':>11} "
        f"{'keepalives/s':>12} {'per inst/min: keepalives':>24} {'writes':>6} "
        f"{'watch A->B p50':>14} {'p99':>8} {'max':>8} {'seen/sent':>9}"
    )
    for r in results:
        e = r.etcd
        rates = (
            f"{e.writes_s:>13.0f} {e.txns_s:>7.0f} {e.proposals_s:>11.0f} {e.keepalives_s:>12.0f} "
            f"{60 * e.keepalives_s / r.size:>24.1f} {60 * e.writes_s / r.size:>6.1f}"
            if e
            else f"{'-':>13} {'-':>7} {'-':>11} {'-':>12} {'-':>24} {'-':>6}"
        )
        p = r.propagation
        print(
            f"{r.store:>6} {r.size:>9} {rates} {ms(p.latencies_ms, 0.5):>14} "
            f"{ms(p.latencies_ms, 0.99):>8} {ms(p.latencies_ms, 1.0):>8} "
            f"{len(p.latencies_ms):>4}/{p.sent:<4}"
        )
    print(
        "(etcd writes/s: etcd_mvcc_put_total + etcd_mvcc_delete_total on the leader, txns/s: "
        "etcd_mvcc_txn_total (transactions of 2+ operations), "
        "proposals/s: etcd_server_proposals_committed_total, "
        "keepalives/s: etcd_debugging_lease_renewed_total; over the steady part of the phase. "
        "watch A->B: a status change by Heartbeat on replica A until its UPSERT on a Watch "
        "on replica B (memory: the same registry))"
    )
    print()
    print("targets:")
    for r in results:
        p = r.propagation
        p99 = percentile(p.latencies_ms, 0.99) if p.latencies_ms else float("inf")
        lapse_ok = r.lapsed == 0 and r.lapses_counted == 0
        prop_ok = p99 < 100 and p.missed == 0 and p.sent > 0
        print(
            f"  {r.store} {r.size}: lapses == 0: {'MET' if lapse_ok else 'NOT MET'} "
            f"({r.lapsed} lapsed, {r.lapses_counted} counted); watch propagation p99 < 100 ms: "
            f"{'MET' if prop_ok else 'NOT MET'} ({ms(p.latencies_ms, 0.99)}, {p.missed} missed)"
        )
    for line in failed:
        print(f"  NOT MEASURED: {line}")
