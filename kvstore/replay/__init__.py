"""Trace replay: hit rates of the service's own index and eviction policies on real traffic.

    trace = load_trace("conversation_trace.jsonl")          # or agent_trace(AgentWorkload())
    report = capacity_curves(trace, [1000, 5000], ["lru", "prefix-lfuda"])
    print(format_curves(report))

- :mod:`.trace`: the Mooncake and token-level trace formats, loading.
- :mod:`.generator`: the synthetic agent-session workload.
- :mod:`.simulator`: single-tier and L2 -> L3 replay through ``TierIndex``.
- :mod:`.belady`: the offline optimum, as a policy replayed the same way.
- :mod:`.report`: capacity curves, tiered runs, tables and JSON.
- :mod:`.plot`: the PNG (optional matplotlib, imported only when used).
"""

from kvstore.replay.belady import BeladyOutOfStep, BeladyPolicy, next_use_positions
from kvstore.replay.generator import AgentWorkload, agent_trace, generate_agent_records
from kvstore.replay.plot import PlotUnavailable, plot_curves, require_matplotlib
from kvstore.replay.report import (
    BELADY,
    CurveReport,
    TieredReport,
    capacity_curves,
    format_curves,
    format_tiered,
    tiered_run,
)
from kvstore.replay.simulator import (
    ProgressBar,
    ReplayError,
    ReplayResult,
    TieredResult,
    ideal_hit_rate,
    replay,
    replay_tiered,
)
from kvstore.replay.trace import (
    Trace,
    TraceFormatError,
    TraceRequest,
    block_id_key,
    load_trace,
    trace_from_block_ids,
)

__all__ = [
    "AgentWorkload", "BELADY", "BeladyOutOfStep", "BeladyPolicy", "CurveReport", "PlotUnavailable",
    "ProgressBar", "ReplayError", "ReplayResult", "TieredReport", "TieredResult", "Trace",
    "TraceFormatError", "TraceRequest", "agent_trace", "block_id_key", "capacity_curves",
    "format_curves", "format_tiered", "generate_agent_records", "ideal_hit_rate", "load_trace",
    "next_use_positions", "plot_curves", "replay", "replay_tiered", "require_matplotlib",
    "tiered_run", "trace_from_block_ids",
]
