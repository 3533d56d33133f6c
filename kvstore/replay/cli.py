"""``kvstore bench hitrate``: replay a request trace through the tier index and its policies.

    kvstore bench hitrate --trace conversation_trace.jsonl
    kvstore bench hitrate --workload agent --capacity 1000,5000 --policy lru,prefix-lfuda --json
    kvstore bench hitrate --trace t.jsonl --tiers L2=5000,L3=50000
    kvstore bench hitrate --trace t.jsonl --plot hitrate.png

This module is glue: arguments in, :mod:`kvstore.replay` does the work, a
table or one JSON object out. ``controller.cli`` mounts ``add_arguments`` and
``run``; ``python -m kvstore.replay.cli`` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvstore.eviction import policy_names
from kvstore.replay import (
    AgentWorkload,
    PlotUnavailable,
    TraceFormatError,
    agent_trace,
    capacity_curves,
    format_curves,
    format_tiered,
    load_trace,
    plot_curves,
    require_matplotlib,
    tiered_run,
)
from kvstore.replay.generator import oneshot_tools_workload
from kvstore.replay.trace import TRACE_FORMATS

DEFAULT_CAPACITIES = "1000,5000,10000,50000"
WORKLOADS = ("agent", "agent-oneshot")


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...] of page counts, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"capacities must be positive page counts, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in policy_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {unknown or text!r}; choose from {', '.join(policy_names())}")
    return names


def _tiers(text: str) -> tuple[int, int]:
    """``L2=N,L3=M`` -> (N, M)."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip().upper()
        if name not in ("L2", "L3") or not value.strip().isdigit() or int(value) <= 0:
            raise argparse.ArgumentTypeError(
                f"--tiers takes L2=N,L3=M with positive page counts, got {text!r}")
        sizes[name] = int(value)
    if set(sizes) != {"L2", "L3"}:
        raise argparse.ArgumentTypeError(f"--tiers needs both L2=N and L3=M, got {text!r}")
    return sizes["L2"], sizes["L3"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the hit-rate bench's options to ``parser``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="PATH",
                        help="trace file: Mooncake JSONL (hash_ids) or our token JSONL "
                             "(see kvstore/replay/trace.py)")
    source.add_argument("--workload", choices=WORKLOADS,
                        help="generate a synthetic workload instead (kvstore/replay/generator.py; "
                             "agent-oneshot: with one-shot tool outputs that scan the tier)")
    parser.add_argument("--format", choices=TRACE_FORMATS, default="auto",
                        help="trace format (default: detected from the first line)")
    parser.add_argument("--page-size", type=_positive_int, default=512, metavar="TOKENS",
                        help="page size for token-level traces (default 512)")
    parser.add_argument("--max-requests", type=_positive_int, metavar="N",
                        help="replay only the first N requests")
    parser.add_argument("--seed", type=int, default=0, help="seed of a generated workload")
    parser.add_argument("--capacity", type=_positive_ints, default=_positive_ints(DEFAULT_CAPACITIES),
                        metavar="N[,N...]", help=f"tier sizes in pages (default {DEFAULT_CAPACITIES})")
    parser.add_argument("--policy", type=_policies, default=None, metavar="NAME[,NAME...]",
                        help=f"eviction policies (default: all of {', '.join(policy_names())})")
    parser.add_argument("--tiers", type=_tiers, metavar="L2=N,L3=M",
                        help="replay L2 over L3 with demotion on eviction, each tier with its own "
                             "instance of each policy (replaces --capacity)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="draw hit rate vs capacity (needs matplotlib: "
                             "pip install 'kvstore[plot]')")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is drawn on stderr only when stderr is a terminal)")


def _load(args: argparse.Namespace):
    if args.workload is not None:
        cfg = AgentWorkload(seed=args.seed) if args.workload == "agent" else oneshot_tools_workload(args.seed)
        trace = agent_trace(cfg)
        if args.max_requests is not None:
            trace = type(trace)(trace.name, trace.requests[: args.max_requests])
        return trace
    return load_trace(args.trace, args.format, args.page_size, args.max_requests)


def run(args: argparse.Namespace) -> int:
    """Run the bench; returns the process exit status."""
    policies = args.policy or policy_names()
    show_progress = not args.no_progress and sys.stderr.isatty()
    try:
        if args.plot:
            if args.tiers:
                raise PlotUnavailable("--plot draws capacity curves; it does not combine with --tiers")
            require_matplotlib()  # fail now, not after the replay
        trace = _load(args)
    except (OSError, TraceFormatError, PlotUnavailable, ValueError) as e:
        print(f"kvstore bench hitrate: {e}", file=sys.stderr)
        return 2
    if args.tiers:
        report = tiered_run(trace, *args.tiers, policies, show_progress=show_progress)
        print(json.dumps(report.to_json()) if args.json else format_tiered(report))
        return 0
    report = capacity_curves(trace, args.capacity, policies, show_progress=show_progress)
    print(json.dumps(report.to_json()) if args.json else format_curves(report))
    if args.plot:
        path = plot_curves([report], args.plot)
        print(f"plot written to {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvstore.replay.cli",
        description="Replay a request trace through the tier index: hit rate per policy and "
                    "capacity, with the Belady bound and the infinite-cache ceiling.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
