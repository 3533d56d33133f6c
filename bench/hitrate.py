"""Hit-rate bench: the conversation trace, the agent workload (seeds 0 and 1) and its one-shot
tool-output variant (seed 2), every policy.

    python bench/hitrate.py [--trace PATH] [--out bench/results] [--no-plot]

Writes ``hitrate.json`` (one object per workload, each as
``kvstore bench hitrate --json`` prints it) and ``hitrate.png`` (one panel
per workload) under ``--out``. The conversation trace is Mooncake's, found
beside the checkout in ../shared/data/traces/ unless ``--trace`` says
otherwise; the agent workloads are generated (seeds 0 and 1, and seed 2 with
one-shot tool outputs scanning the tier). For the adaptive
policy each result also lists which expert it followed from which reference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from kvstore.eviction import DEFAULT_POLICY, policy_names
from kvstore.replay import (
    AgentWorkload,
    CurveReport,
    Trace,
    agent_trace,
    capacity_curves,
    format_curves,
    load_trace,
)
from kvstore.replay.generator import oneshot_tools_workload

ROOT = Path(__file__).resolve().parent.parent
# Beside the checkout (../shared), or beside the directory of worktrees (../../shared).
DEFAULT_TRACE = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared")
                      if (p / "data" / "traces" / "conversation_trace.jsonl").exists()),
                     ROOT.parent / "shared") / "data" / "traces" / "conversation_trace.jsonl"
CAPACITIES = (1000, 5000, 10000, 50000)


def _load(workload: tuple[str, object]) -> Trace:
    kind, arg = workload
    if kind == "trace":
        return load_trace(Path(str(arg)))
    if kind == "agent":
        return agent_trace(AgentWorkload(seed=int(arg)))  # type: ignore[arg-type]
    return agent_trace(oneshot_tools_workload(int(arg)))  # type: ignore[arg-type]


def _curves(workload: tuple[str, object]) -> CurveReport:
    """Every policy at every capacity on one workload (one process of --jobs)."""
    trace = _load(workload)
    start = time.perf_counter()
    report = capacity_curves(trace, CAPACITIES, policy_names(), show_progress=sys.stderr.isatty())
    print(format_curves(report))
    print(f"({time.perf_counter() - start:.1f} s)\n", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workloads replayed at once, one process each (times are CPU seconds)")
    args = parser.parse_args(argv)
    if not args.trace.exists():
        print(f"trace {args.trace} not found; pass --trace PATH", file=sys.stderr)
        return 2
    workloads = [("trace", str(args.trace)), ("agent", 0), ("agent", 1), ("oneshot", 2)]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(workloads))) as pool:
            reports = pool.map(_curves, workloads)
    else:
        reports = [_curves(w) for w in workloads]
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"default_policy": DEFAULT_POLICY, "capacities": list(CAPACITIES),
           "seconds": "CPU seconds of each replay (process time)",
           "load_avg_at_end": os.getloadavg(), "workloads": [r.to_json() for r in reports]}
    (args.out / "hitrate.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out / 'hitrate.json'}")
    if not args.no_plot:
        from kvstore.replay import PlotUnavailable, plot_curves

        try:
            print(f"wrote {plot_curves(reports, args.out / 'hitrate.png')}")
        except PlotUnavailable as e:
            print(f"no plot: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
