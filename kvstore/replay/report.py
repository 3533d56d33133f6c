"""Hit-rate studies over a trace: capacity curves with the Belady bound, tiered runs, tables.

    report = capacity_curves(trace, [1000, 5000], ["lru", "prefix-lfuda"])
    print(format_curves(report)); json.dumps(report.to_json())

Belady (the offline optimum, policy ``"belady"``) is replayed at every
capacity and every policy's ``fraction_of_belady`` is its hit rate over
Belady's at the same capacity. ``ideal`` is the infinite-cache ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kvstore.page_keys import PageKey
from kvstore.replay.belady import BeladyPolicy
from kvstore.replay.simulator import (
    ProgressBar,
    ReplayResult,
    TieredResult,
    ideal_hit_rate,
    replay,
    replay_tiered,
)
from kvstore.replay.trace import Trace

BELADY = "belady"


def _ratio(x: float, y: float) -> float:
    return x / y if y > 0 else 0.0


@dataclass(frozen=True)
class CurveReport:
    """Hit rates of several policies (and Belady) at several capacities over one trace."""

    trace: str
    num_requests: int
    num_blocks: int
    ideal: float
    results: list[ReplayResult] = field(default_factory=list)

    def belady(self, capacity: int) -> float:
        for r in self.results:
            if r.policy == BELADY and r.capacity == capacity:
                return r.hit_rate
        raise KeyError(f"no Belady result at capacity {capacity}")

    def fraction_of_belady(self, result: ReplayResult) -> float:
        return _ratio(result.hit_rate, self.belady(result.capacity))

    @property
    def capacities(self) -> list[int]:
        return sorted({r.capacity for r in self.results})

    @property
    def policies(self) -> list[str]:
        """Policy names in the order first replayed, Belady first."""
        return list(dict.fromkeys(r.policy for r in self.results))

    def to_json(self) -> dict:
        return {
            "trace": self.trace,
            "requests": self.num_requests,
            "blocks": self.num_blocks,
            "ideal": self.ideal,
            "results": [
                {"policy": r.policy, "capacity": r.capacity, "hit_rate": r.hit_rate,
                 "fraction_of_belady": self.fraction_of_belady(r), "seconds": round(r.seconds, 3),
                 **({"followed": [list(step) for step in r.followed]} if r.followed else {})}
                for r in self.results
            ],
        }


def trace_refs(trace: Trace) -> list[PageKey]:
    """Every block reference of the trace, in replay order (Belady's future)."""
    return [key for request in trace.requests for key in request.keys]


def capacity_curves(
    trace: Trace,
    capacities: Sequence[int],
    policies: Sequence[str],
    show_progress: bool = False,
) -> CurveReport:
    """Replay Belady and each policy at each capacity (single tier)."""
    refs = trace_refs(trace)
    results: list[ReplayResult] = []
    for capacity in capacities:
        for name in [BELADY, *policies]:
            policy = BeladyPolicy(refs) if name == BELADY else name
            with ProgressBar(len(refs), f"{name}@{capacity}", enabled=show_progress) as bar:
                results.append(replay(trace, capacity, policy, progress=bar))
    return CurveReport(trace.name, trace.num_requests, len(refs), ideal_hit_rate(trace), results)


@dataclass(frozen=True)
class TieredReport:
    """Hit rates per tier of several policies over one L2 -> L3 hierarchy."""

    trace: str
    num_requests: int
    num_blocks: int
    ideal: float
    l2_capacity: int
    l3_capacity: int
    belady: ReplayResult
    """Belady for one tier as large as L2 and L3 together: a bound on the pair."""
    results: list[TieredResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "trace": self.trace,
            "requests": self.num_requests,
            "blocks": self.num_blocks,
            "ideal": self.ideal,
            "tiers": {"L2": self.l2_capacity, "L3": self.l3_capacity},
            "results": [
                {"policy": BELADY, "capacity": self.belady.capacity,
                 "hit_rate": self.belady.hit_rate, "fraction_of_belady": 1.0},
                *({"policy": r.policy, "capacity": r.l2_capacity + r.l3_capacity,
                   "hit_rate": r.hit_rate, "l2_hit_rate": r.l2_hit_rate,
                   "l3_hit_rate": r.l3_hit_rate, "demotions": r.num_demotions,
                   "fraction_of_belady": _ratio(r.hit_rate, self.belady.hit_rate),
                   "seconds": round(r.seconds, 3)}
                  for r in self.results),
            ],
        }


def tiered_run(
    trace: Trace, l2_capacity: int, l3_capacity: int, policies: Sequence[str],
    show_progress: bool = False,
) -> TieredReport:
    """Replay each policy over L2 (``l2_capacity``) demoting into L3 (``l3_capacity``)."""
    refs = trace_refs(trace)
    with ProgressBar(len(refs), f"{BELADY}@{l2_capacity + l3_capacity}", enabled=show_progress) as bar:
        bound = replay(trace, l2_capacity + l3_capacity, BeladyPolicy(refs), progress=bar)
    results = []
    for name in policies:
        with ProgressBar(len(refs), f"{name}@L2={l2_capacity},L3={l3_capacity}",
                         enabled=show_progress) as bar:
            results.append(replay_tiered(trace, l2_capacity, l3_capacity, name, progress=bar))
    return TieredReport(trace.name, trace.num_requests, len(refs), ideal_hit_rate(trace),
                        l2_capacity, l3_capacity, bound, results)


def _header(trace: str, num_requests: int, num_blocks: int, ideal: float) -> str:
    return (f"trace {trace}: {num_requests:,} requests, {num_blocks:,} block references; "
            f"ceiling (infinite cache) {ideal:.2%}")


def format_curves(report: CurveReport) -> str:
    """A readable table: one row per capacity, one column per policy (hit rate, x Belady)."""
    names = report.policies
    width = max(16, *(len(n) + 2 for n in names))
    lines = [_header(report.trace, report.num_requests, report.num_blocks, report.ideal), "",
             f"{'capacity':>10}" + "".join(f"{n:>{width}}" for n in names)]
    by_key = {(r.policy, r.capacity): r for r in report.results}
    for capacity in report.capacities:
        cells = []
        for name in names:
            r = by_key.get((name, capacity))
            if r is None:
                cells.append(f"{'-':>{width}}")
            elif name == BELADY:
                cells.append(f"{r.hit_rate:>{width}.2%}")
            else:
                cell = f"{r.hit_rate:.2%} ({report.fraction_of_belady(r):.2f}x)"
                cells.append(f"{cell:>{width}}")
        lines.append(f"{capacity:>10,}" + "".join(cells))
    lines.append("")
    lines.append("cells: hit rate (fraction of Belady at that capacity)")
    return "\n".join(lines)


def format_tiered(report: TieredReport) -> str:
    lines = [_header(report.trace, report.num_requests, report.num_blocks, report.ideal),
             f"tiers: L2 {report.l2_capacity:,} pages, L3 {report.l3_capacity:,} pages; "
             f"Belady bound (one tier of {report.belady.capacity:,}): {report.belady.hit_rate:.2%}",
             "", f"{'policy':<16}{'L2 hits':>10}{'L3 hits':>10}{'total':>10}{'x Belady':>10}"
             f"{'demotions':>12}"]
    for r in report.results:
        lines.append(f"{r.policy:<16}{r.l2_hit_rate:>10.2%}{r.l3_hit_rate:>10.2%}"
                     f"{r.hit_rate:>10.2%}{_ratio(r.hit_rate, report.belady.hit_rate):>9.2f}x"
                     f"{r.num_demotions:>12,}")
    return "\n".join(lines)
