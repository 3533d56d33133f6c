"""A synthetic workload: multi-turn agent sessions with tool calls and shared system prompts.

Why: one production trace is not enough to choose an eviction policy; a
policy must not be fit to it. This generator produces a second workload of a
different shape, written in the Mooncake format (so every tool reads it) and
fully determined by its config and seed.

The model (every number is a field of :class:`AgentWorkload`)::

    sessions arrive as a Poisson process (session_rate per second)
    each session uses one of num_apps agent apps (Zipf popularity, exponent app_zipf);
        an app has a system prompt + tool schema of ~system_tokens, shared by
        all of its sessions
    a session has a geometric number of user turns (mean turns_per_session):
        user message: ~user_tokens; with probability doc_probability it carries
            a document of ~doc_tokens (pasted file, retrieved pages)
        the agent then makes a geometric number of tool calls (mean
            tool_calls_per_turn) before its final answer; every step is one
            LLM request whose prompt is the whole history so far:
                system, user, [assistant call, tool result]*, ...
            the request's output (~output_tokens) joins the history; a tool
            result (~tool_tokens) follows after tool_latency_s (exponential)
        with probability retry_probability the user rewrites the last message
            instead of continuing (the history forks before it)
        between turns the user thinks for think_time_s (exponential)
    lengths are lognormal around the given medians (sigma length_sigma)

Block ids follow Mooncake's rule: the prompt is cut into 512-token blocks and
two blocks get the same id exactly when the token sequences up to their ends
are equal. Tokens are never materialised: a prompt is a list of segments
(unique id, length) and a block is named by its parent's id and the segment
pieces it covers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kvstore.replay.trace import MOONCAKE_BLOCK_TOKENS, Trace, mooncake_requests

Segment = tuple[int, int]  # (segment id, length in tokens); equal id means equal tokens


@dataclass(frozen=True)
class AgentWorkload:
    """Parameters of the agent workload; the defaults give ~300K block references."""

    num_sessions: int = 600
    """Sessions in the trace."""
    session_rate: float = 2.0
    """Poisson arrival rate of new sessions, per second."""
    num_apps: int = 40
    """Distinct agent apps, each with its own system prompt."""
    app_zipf: float = 1.1
    """Zipf exponent of app popularity (rank r is chosen with weight r**-app_zipf)."""
    system_tokens: int = 3000
    """Median system prompt + tool schema length."""
    turns_per_session: float = 4.0
    """Mean user turns per session (geometric)."""
    tool_calls_per_turn: float = 2.0
    """Mean tool calls per user turn (geometric, may be 0)."""
    user_tokens: int = 150
    """Median user message length."""
    doc_probability: float = 0.2
    """Chance that a user message carries a document."""
    doc_tokens: int = 6000
    """Median document length."""
    output_tokens: int = 200
    """Median LLM output length (tool call or answer)."""
    tool_tokens: int = 800
    """Median tool result length."""
    length_sigma: float = 0.8
    """Sigma of every lognormal length."""
    tool_latency_s: float = 2.0
    """Mean tool execution time, seconds (exponential)."""
    think_time_s: float = 60.0
    """Mean user think time between turns, seconds (exponential)."""
    decode_ms_per_token: float = 20.0
    """Time to generate one output token, for the request's duration."""
    retry_probability: float = 0.05
    """Chance that a turn rewrites the previous user message instead of continuing."""
    oneshot_tool_probability: float = 0.0
    """Chance that a tool call returns a one-shot output (a file dump, a search
    page, a log): read by the next request only, then dropped from the history
    (agents truncate stale tool outputs), so its pages are used once and scan
    through the tier. 0 leaves the trace as it was for the same seed."""
    oneshot_tool_tokens: int = 8000
    """Median one-shot tool output length."""
    seed: int = 0
    """Seed of every random choice: same config, same trace."""

    def __post_init__(self) -> None:
        positive = ("num_sessions", "session_rate", "num_apps", "system_tokens", "turns_per_session",
                    "user_tokens", "doc_tokens", "output_tokens", "tool_tokens",
                    "oneshot_tool_tokens")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"AgentWorkload.{name} must be > 0, got {getattr(self, name)}")
        for name in ("doc_probability", "retry_probability", "oneshot_tool_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AgentWorkload.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tool_calls_per_turn < 0 or self.length_sigma < 0:
            raise ValueError("AgentWorkload.tool_calls_per_turn and length_sigma must be >= 0")


class _BlockNamer:
    """Mooncake block ids for segment lists: equal token prefix <=> equal id."""

    def __init__(self, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._ids: dict[tuple, int] = {}

    def hash_ids(self, segments: list[Segment]) -> list[int]:
        ids: list[int] = []
        pieces: list[tuple[int, int, int]] = []  # (segment id, start, end) inside the open block
        room = self.block_tokens
        parent = -1
        for seg_id, length in segments:
            start = 0
            while start < length:
                take = min(room, length - start)
                pieces.append((seg_id, start, start + take))
                start += take
                room -= take
                if room == 0:
                    parent = self._name(parent, pieces)
                    ids.append(parent)
                    pieces, room = [], self.block_tokens
        if pieces:  # the partial last block is named too, as in Mooncake's traces
            ids.append(self._name(parent, pieces))
        return ids

    def _name(self, parent: int, pieces: list[tuple[int, int, int]]) -> int:
        ident = (parent, tuple(pieces))
        found = self._ids.get(ident)
        if found is None:
            found = self._ids[ident] = len(self._ids)
        return found


class _Session:
    """One agent session's random walk; yields (time offset s, prompt segments, output length)."""

    def __init__(self, cfg: AgentWorkload, rng: np.random.Generator, system: Segment,
                 next_segment: Iterator[int]) -> None:
        self.cfg, self.rng, self.system, self._ids = cfg, rng, system, next_segment

    def _len(self, median: int) -> int:
        return max(1, int(median * math.exp(self.cfg.length_sigma * self.rng.standard_normal())))

    def _geometric(self, mean: float, at_least: int) -> int:
        """A geometric count with the given mean, not below ``at_least`` (0 or 1)."""
        extra_mean = mean - at_least
        if extra_mean <= 0:
            return at_least
        return at_least + int(self.rng.geometric(1.0 / (extra_mean + 1.0))) - 1

    def requests(self) -> Iterator[tuple[float, list[Segment], int]]:
        cfg, rng = self.cfg, self.rng
        history: list[Segment] = [self.system]
        t = 0.0
        last_user_at = 1
        for turn in range(self._geometric(cfg.turns_per_session, 1)):
            if turn and rng.random() < cfg.retry_probability:
                del history[last_user_at:]  # rewrite the last message: fork before it
            last_user_at = len(history)
            history.append((next(self._ids), self._len(cfg.user_tokens)))
            if rng.random() < cfg.doc_probability:
                history.append((next(self._ids), self._len(cfg.doc_tokens)))
            num_calls = self._geometric(cfg.tool_calls_per_turn, 0)
            oneshot: Segment | None = None
            for step in range(num_calls + 1):
                output = self._len(cfg.output_tokens)
                yield t, list(history), output
                if oneshot is not None:  # read once: the agent drops it from the history
                    history.remove(oneshot)
                    oneshot = None
                t += output * cfg.decode_ms_per_token / 1000.0
                history.append((next(self._ids), output))
                if step < num_calls:  # a tool call: run it, its result joins the history
                    t += rng.exponential(cfg.tool_latency_s)
                    result, is_oneshot = self._tool_result()
                    history.append(result)
                    oneshot = result if is_oneshot else None
            t += rng.exponential(cfg.think_time_s)

    def _tool_result(self) -> tuple[Segment, bool]:
        """The next tool output and whether it is one-shot (read by one request only)."""
        cfg = self.cfg
        # No draw when the feature is off: the same seed gives the same trace as before.
        if cfg.oneshot_tool_probability and self.rng.random() < cfg.oneshot_tool_probability:
            return (next(self._ids), self._len(cfg.oneshot_tool_tokens)), True
        return (next(self._ids), self._len(cfg.tool_tokens)), False


def generate_agent_records(cfg: AgentWorkload) -> list[dict]:
    """The workload as Mooncake records, in arrival order."""
    rng = np.random.default_rng(cfg.seed)
    counter = iter(range(1 << 62))
    weights = np.arange(1, cfg.num_apps + 1, dtype=float) ** -cfg.app_zipf
    apps = [(next(counter), max(1, int(cfg.system_tokens * math.exp(0.5 * rng.standard_normal()))))
            for _ in range(cfg.num_apps)]
    events: list[tuple[float, int, list[Segment], int]] = []
    start = 0.0
    for n in range(cfg.num_sessions):
        start += rng.exponential(1.0 / cfg.session_rate)
        app = apps[int(rng.choice(cfg.num_apps, p=weights / weights.sum()))]
        for offset, segments, output in _Session(cfg, rng, app, counter).requests():
            events.append((start + offset, n, segments, output))
    events.sort(key=lambda e: (e[0], e[1]))
    namer = _BlockNamer()
    return [
        {"timestamp": int(ts * 1000), "input_length": sum(length for _, length in segs),
         "output_length": output, "hash_ids": namer.hash_ids(segs)}
        for ts, _, segs, output in events
    ]


def oneshot_tools_workload(seed: int = 2) -> AgentWorkload:
    """The bench's scan variant: three in ten tool calls return a one-shot output
    (~8,000 tokens, 16 pages of 512) that scans through the tier once."""
    return AgentWorkload(seed=seed, oneshot_tool_probability=0.3)


def agent_trace(cfg: AgentWorkload | None = None) -> Trace:
    """The agent workload as a Trace, named by its seed."""
    cfg = cfg or AgentWorkload()
    records = generate_agent_records(cfg)
    name = f"agent-sessions(seed={cfg.seed}"
    if cfg.oneshot_tool_probability:
        name += f", one-shot tools {cfg.oneshot_tool_probability:g}"
    return Trace(name + ")", mooncake_requests(enumerate(records, 1), "agent"))


def write_jsonl(records: list[dict], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kvstore.replay.generator",
        description="Write the agent-session workload as a Mooncake-format JSONL trace.")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    for name, value in asdict(AgentWorkload()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    records = generate_agent_records(AgentWorkload(**args))
    write_jsonl(records, out)
    print(f"wrote {len(records)} requests, {sum(len(r['hash_ids']) for r in records)} blocks to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
