"""The agent workload generator: deterministic, prefix-consistent, shaped as documented."""

from __future__ import annotations

import dataclasses

import pytest

from kvstore.replay import AgentWorkload, agent_trace, generate_agent_records, ideal_hit_rate
from kvstore.replay.generator import _BlockNamer, oneshot_tools_workload

SMALL = AgentWorkload(num_sessions=25, num_apps=3, session_rate=1.0, seed=7)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    assert generate_agent_records(SMALL) == generate_agent_records(SMALL)
    other = AgentWorkload(num_sessions=25, num_apps=3, session_rate=1.0, seed=8)
    assert generate_agent_records(other) != generate_agent_records(SMALL)


def test_records_follow_the_mooncake_rules() -> None:
    records = generate_agent_records(SMALL)
    assert [r["timestamp"] for r in records] == sorted(r["timestamp"] for r in records)
    parent_of: dict[int, int | None] = {}
    for r in records:
        ids = r["hash_ids"]
        assert len(ids) == -(-r["input_length"] // 512)
        for i, block in enumerate(ids):
            parent = ids[i - 1] if i else None
            # equal id => equal prefix: an id always follows the same id
            assert parent_of.setdefault(block, parent) == parent


def test_sessions_reuse_history_and_share_system_prompts() -> None:
    t = agent_trace(SMALL)
    assert ideal_hit_rate(t) > 0.5  # every agent step re-reads its history
    first_blocks = {r.keys[0] for r in t.requests}
    assert len(first_blocks) <= SMALL.num_apps  # system prompts of >= 512 tokens are shared


def test_block_namer_names_equal_prefixes_equally() -> None:
    namer = _BlockNamer(block_tokens=4)
    a = namer.hash_ids([(1, 6), (2, 3)])  # 9 tokens: blocks [1x4] [1x2,2x2] [2x1]
    b = namer.hash_ids([(1, 6), (3, 3)])
    c = namer.hash_ids([(1, 4), (1, 2)])  # different segment cut = different tokens
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1]
    assert c[0] == a[0] and c[1] != a[1]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="num_sessions"):
        AgentWorkload(num_sessions=0)
    with pytest.raises(ValueError, match="doc_probability"):
        AgentWorkload(doc_probability=1.5)


def _once_fraction(cfg) -> float:
    """Fraction of distinct blocks that only one request references."""
    from collections import Counter

    uses = Counter(b for r in generate_agent_records(cfg) for b in set(r["hash_ids"]))
    return sum(1 for n in uses.values() if n == 1) / len(uses)


def test_one_shot_tool_outputs_are_read_once_then_dropped():
    base = AgentWorkload(num_sessions=40, seed=5, tool_calls_per_turn=3.0)
    scan = dataclasses.replace(base, oneshot_tool_probability=1.0)
    # Every tool output is read by one request only: far more blocks used once.
    assert _once_fraction(scan) > _once_fraction(base) + 0.2
    # A one-shot output is gone from the next request's prompt, so prompts are shorter.
    def tokens(cfg):
        return sum(r["input_length"] for r in generate_agent_records(cfg))
    assert tokens(scan) < tokens(dataclasses.replace(base, tool_tokens=8000))


def test_one_shot_off_leaves_the_trace_as_it_was():
    cfg = AgentWorkload(num_sessions=30, seed=3)
    assert generate_agent_records(dataclasses.replace(cfg, oneshot_tool_probability=0.0,
                                                      oneshot_tool_tokens=123)) == generate_agent_records(cfg)
    assert agent_trace(oneshot_tools_workload(3)).name != agent_trace(AgentWorkload(seed=3)).name
    with pytest.raises(ValueError):
        AgentWorkload(oneshot_tool_probability=1.5)
