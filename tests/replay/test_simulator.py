"""The replay against hand-computed cases: the prefix rule, LRU, Belady, tiers, the ceiling."""

from __future__ import annotations

import pytest

import kvstore.replay.simulator as simulator
from kvstore.eviction.lru import LRUPolicy
from kvstore.replay import (
    BeladyOutOfStep,
    BeladyPolicy,
    ideal_hit_rate,
    next_use_positions,
    replay,
    replay_tiered,
    trace_from_block_ids,
)
from kvstore.replay.report import trace_refs
from kvstore.index.tier_index import TierIndex


def trace(*requests: list[int]):
    return trace_from_block_ids("hand", requests)


def hits(t, capacity: int, policy) -> int:
    return replay(t, capacity, policy).num_hits


def test_replay_runs_the_service_index_and_policy_objects() -> None:
    assert simulator.TierIndex is TierIndex  # no second implementation of the index

    class Recording(LRUPolicy):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def on_insert(self, key, parent) -> None:
            self.calls += 1
            super().on_insert(key, parent)

        def on_access(self, key) -> None:
            self.calls += 1
            super().on_access(key)

        def on_access_run(self, keys) -> None:  # a lookup's hits come as one run
            self.calls += len(keys)
            super().on_access_run(keys)

    policy = Recording()
    result = replay(trace([1, 2], [1, 3]), 8, policy)
    assert policy.calls == result.num_refs == 4  # one insert or access per block reference


def test_lru_by_hand() -> None:
    # capacity 3; LRU order oldest first after each request:
    # [1,2] miss miss       -> 1 2
    # [1,3] hit  miss       -> 2 1 3
    # [4]   miss, evict 2   -> 1 3 4
    # [1,2] hit, miss evict 3 -> 4 1 2
    # [1,3] hit, miss evict 4 -> 2 1 3           hits 3 of 9
    result = replay(trace([1, 2], [1, 3], [4], [1, 2], [1, 3]), 3, "lru")
    assert (result.num_hits, result.num_refs) == (3, 9)
    assert result.hit_rate == pytest.approx(3 / 9)


def test_prefix_rule_nothing_counts_after_the_first_miss() -> None:
    # capacity 3, LRU: [4] evicts page 1, the head of the chain 1-2-3. Pages 2
    # and 3 are still cached when [1,2,3] returns, but they follow a miss.
    t = trace([1, 2, 3], [4], [1, 2, 3])
    assert hits(t, 3, "lru") == 0
    # prefix-lru shortens the chain from its tail instead: 1 and 2 hit.
    assert hits(t, 3, "prefix-lru") == 2


def test_belady_by_hand() -> None:
    # capacity 2, refs 1 2 3 1 2: at 3, page 2 is used later than page 1 -> evict 2.
    t = trace([1], [2], [3], [1], [2])
    assert hits(t, 2, BeladyPolicy(trace_refs(t))) == 1
    assert hits(t, 2, "lru") == 0
    # With chains: at [4] the tail 3 is never used again; 1 and 2 are -> 2 hits.
    t = trace([1, 2, 3], [4], [1, 2])
    assert hits(t, 3, BeladyPolicy(trace_refs(t))) == 2


def test_belady_evicts_the_child_before_its_parent_when_both_return() -> None:
    # capacity 2: [1,2] then [3] must evict one of 1, 2, both needed by the
    # last request. Evicting 2 keeps one hit; evicting 1 would keep none.
    t = trace([1, 2], [3], [1, 2])
    assert hits(t, 2, BeladyPolicy(trace_refs(t))) == 1


def test_next_use_positions() -> None:
    a, b = b"a" * 16, b"b" * 16
    assert next_use_positions([a, b, a, a, b]) == [2, 4, 3, 5, 5]


def test_belady_replayed_out_of_step_raises() -> None:
    t = trace([1, 2])
    other = trace([1, 3])
    with pytest.raises(BeladyOutOfStep):
        replay(t, 4, BeladyPolicy(trace_refs(other)))


def test_ideal_is_the_unbounded_cache() -> None:
    t = trace([1, 2], [1, 2, 3], [4], [1, 5])
    assert ideal_hit_rate(t) == pytest.approx((0 + 2 + 0 + 1) / 8)
    assert replay(t, 100, "lru").hit_rate == pytest.approx(ideal_hit_rate(t))


def test_tiered_demotion_by_hand() -> None:
    # L2 = 2, L3 = 2, LRU in both.
    # [1,2]   -> L2: 1 2
    # [3]     -> evict 1 from L2 -> L3: 1;  L2: 2 3
    # [1,2]   -> 1 is an L3 hit: evict 2 -> L3: 1 2 (1 touched first); L2: 3 1
    #            2 is an L3 hit: evict 3 -> L3 full, evicts 1 -> L3: 2 3; L2: 1 2
    # [1,2]   -> two L2 hits
    t = trace([1, 2], [3], [1, 2], [1, 2])
    result = replay_tiered(t, 2, 2, "lru")
    assert (result.num_l2_hits, result.num_l3_hits) == (2, 2)
    assert (result.num_refs, result.num_demotions) == (7, 3)
    assert result.hit_rate == pytest.approx(4 / 7)


def test_tiered_with_no_room_below_is_like_one_tier() -> None:
    t = trace([1, 2], [1, 3], [4], [1, 2], [1, 3])
    tiered = replay_tiered(t, 3, 1, "lru")
    assert tiered.num_l2_hits == hits(t, 3, "lru")


def test_progress_is_reported_per_request() -> None:
    seen: list[int] = []
    replay(trace([1, 2], [1], [3, 4, 5]), 4, "lru", progress=seen.append)
    assert seen == [2, 3, 6]


def test_progress_bar_draws_on_its_stream_and_clears_the_line() -> None:
    import io

    from kvstore.replay import ProgressBar

    stream = io.StringIO()
    with ProgressBar(100, "lru@10", stream=stream) as bar:
        bar(100)
    out = stream.getvalue()
    assert "lru@10" in out and "100.0%" in out and out.endswith("\r\033[K")
    silent = io.StringIO()
    with ProgressBar(100, "x", stream=silent, enabled=False) as bar:
        bar(50)
    assert silent.getvalue() == ""
