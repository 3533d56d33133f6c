"""What each policy is for, in small narrated scenarios (the shared contract is in test_eviction.py)."""

from __future__ import annotations

import random

import pytest

from kvstore.eviction import prefix_lhd
from kvstore.replay import replay, trace_from_block_ids
from kvstore.index.tier_index import TierIndex

ANY = lambda k: True  # noqa: E731


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def ids(keys) -> list[int]:
    return [int.from_bytes(k, "little") for k in keys]


def index_with(name: str, capacity: int, pages, hits=()) -> TierIndex:
    """An index holding ``pages`` as independent roots, then ``hits`` touched in order."""
    index = TierIndex(capacity, name)
    for p in pages:
        index.insert(key(p), p)
    index.touch(key(h) for h in hits)
    index.check_integrity()
    return index


def test_lfu_evicts_the_least_hit_then_the_least_recent() -> None:
    index = index_with("lfu", 4, [1, 2, 3, 4], hits=[1, 1, 2, 3])
    assert ids(index.policy.choose_victims(2, ANY)) == [4, 2]  # 4: no hit; 2 and 3 tie, 2 older


def test_s3fifo_one_hit_wonders_leave_first_and_ghosts_come_back_to_main() -> None:
    index = index_with("s3fifo", 10, range(10), hits=[0])
    # All ten pages start in the small queue (target 10% = 1 page). Its oldest,
    # 0, was hit, so it moves to main; the next oldest, 1, never was: it goes.
    (victim, _), = index.evict(1)
    assert ids([victim]) == [1]
    index.insert(key(10), 10)
    (victim2, _), = index.evict(1)
    index.insert(key(1), 1)  # 1 is a ghost now: it goes straight to main
    assert key(1) in index.policy._main
    assert victim2 != key(0)
    index.check_integrity()


def test_arc_moves_a_page_hit_twice_to_t2_and_adapts_on_ghost_hits() -> None:
    index = index_with("arc", 3, [1, 2, 3], hits=[1])
    policy = index.policy
    assert key(1) in policy._t2 and key(2) in policy._t1
    (victim, _), = index.evict(1)  # T1 is above its target (p = 0): its LRU page goes
    assert ids([victim]) == [2]
    index.insert(key(2), 2)  # a B1 ghost hit grows T1's target
    assert policy._p > 0 and key(2) in policy._t2


def chain_victims(name: str) -> list[int]:
    """Victims, in order, of an index holding the chain 1 -> 2 -> 3 and the page 4 (newest)."""
    index = TierIndex(4, name)
    for k, parent in ((1, None), (2, 1), (3, 2), (4, None)):
        index.insert(key(k), k, key(parent) if parent else None)
    return ids(index.policy.choose_victims(3, ANY))


def test_prefix_lru_shortens_the_least_recent_chain_from_its_tail() -> None:
    assert chain_victims("prefix-lru") == [3, 2, 1]
    assert chain_victims("lru") == [1, 2, 3]  # strands 2 and 3 behind the evicted head


def test_prefix_lfuda_keeps_reused_pages_over_new_ones_and_ages_them_out() -> None:
    index = index_with("prefix-lfuda", 3, [1, 2], hits=[1, 2])
    index.insert(key(3), 3)  # new: count 1, the others 2
    (victim, _), = index.evict(1)
    assert ids([victim]) == [3]
    # Every eviction raises the age to the victim's priority, so new pages
    # catch up with old counts: after enough turnover 1 and 2 go too.
    for k in range(10, 16):
        index.evict(1)
        index.insert(key(k), k)
    assert key(1) not in index and key(2) not in index
    index.check_integrity()


def test_prefix_lfuda_ghost_remembers_a_count_across_an_eviction() -> None:
    index = index_with("prefix-lfuda", 2, [1], hits=[1])  # count 2
    index.insert(key(2), 2)
    for victim, _ in index.evict(2):
        pass
    index.insert(key(1), 1)  # back from the ghost list: count 3
    index.insert(key(3), 3)  # count 1
    (victim, _), = index.evict(1)
    assert ids([victim]) == [3]
    assert index.policy._count[key(1)] == 3


def test_prefix_slru_evicts_probation_before_protected() -> None:
    index = index_with("prefix-slru", 4, [1, 2, 3], hits=[1])  # 1 is protected now
    index.insert(key(4), 4)
    # 2, 3 and 4 were never hit: they go first, least recent first; 1 last.
    assert ids(index.policy.choose_victims(4, ANY)) == [2, 3, 4, 1]


def test_prefix_slru_protects_a_page_that_comes_back_from_the_ghost_list() -> None:
    index = index_with("prefix-slru", 2, [1, 2])
    index.evict(2)
    index.insert(key(1), 1)  # remembered: protected at once
    index.insert(key(3), 3)  # new: probation
    assert ids(index.policy.choose_victims(2, ANY)) == [3, 1]
    index.check_integrity()


def test_prefix_slru_protection_expires_after_two_idle_lifetimes() -> None:
    index = index_with("prefix-slru", 4, [1], hits=[1])  # protected
    # Stream new pages through the other three slots. Page 1 was last used at
    # reference 2; after 2 x 4 more references (at the insert of 18) it is
    # demoted to probation's recent end, and it is the oldest page when 22 needs room.
    for k in range(10, 23):
        if index.num_free == 0:
            (victim, _), = index.evict(1)
            assert victim != key(1) or k == 22
        index.insert(key(k), k)
    assert key(1) not in index  # demoted when it went stale, then evicted like any page
    index.check_integrity()


# ---- prefix-lhd ---------------------------------------------------------------
E8, E9, E40 = 2 ** (9 / 4), 2 ** (10 / 4), 2 ** (41 / 4)  # upper edges of buckets 8, 9, 40


def lhd_counts(**buckets: int) -> list[float]:
    """An interval histogram with ``b<bucket>=count`` entries, e.g. lhd_counts(b8=2)."""
    counts = [0.0] * prefix_lhd._NUM_BUCKETS
    for name, count in buckets.items():
        counts[int(name[1:])] = float(count)
    return counts


def test_prefix_lhd_hull_steps_charge_each_interval_its_age_cap() -> None:
    # One reuse at L <= E8, one at L <= E40. Keeping until E8 earns 1 hit and
    # costs E8 for it plus E8 for the page still waiting; going on to E40 earns
    # the second hit for E40 - E8 more.
    steps = prefix_lhd._hull_steps(lhd_counts(b8=1, b40=1), censored=0.0)
    assert steps == [(pytest.approx(2 * E8), 1.0, E8), (pytest.approx(E40 - E8), 1.0, E40)]
    # A step that pays less than a longer one is skipped (upper concave hull):
    # 1 hit at E8 among 9 pages (1 per 9 x E8), then the other 8 at E9, just
    # after: stopping at E8 is never worth it.
    (step,) = prefix_lhd._hull_steps(lhd_counts(b8=1, b9=8), censored=0.0)
    assert step == (pytest.approx(E8 + 8 * E9), 9.0, E9)


def test_prefix_lhd_spends_the_budget_on_the_best_hits_per_page_reference() -> None:
    # Class 0: 1 of 10 pages reused after <= E8 (the other 9 never): 1 hit for
    # 10 x E8. Class 1: both pages reused after <= E8: 2 hits for 2 x E8.
    counts = [lhd_counts(b8=1), lhd_counts(b8=2)]
    censored = [9.0, 0.0]
    assert prefix_lhd.fit_retention(counts, censored, budget=100.0) == [E8, E8]
    # Budget 2 x E8 + 5 x E8: class 1 first (10x the hits per cost), then half
    # of class 0's step: its pages are kept half as long.
    retention = prefix_lhd.fit_retention(counts, censored, budget=7 * E8)
    assert retention == [pytest.approx(E8 / 2), E8]
    assert prefix_lhd.fit_retention(counts, censored, budget=E8) == [0.0, pytest.approx(E8 / 2)]


def test_prefix_lhd_with_one_class_is_prefix_lru() -> None:
    rng = random.Random(7)
    requests = [[0] + [rng.randrange(1, 60) * 100 + j for j in range(rng.randrange(1, 6))]
                for _ in range(3000)]
    trace = trace_from_block_ids("random", requests)
    lhd = replay(trace, 40, prefix_lhd.PrefixLHDPolicy(num_classes=1))
    assert lhd.num_hits == replay(trace, 40, "prefix-lru").num_hits


def test_prefix_lhd_learns_to_give_up_new_pages_first() -> None:
    # Capacity 16. Four hot pages are used every 20 references; every other
    # reference is a new page never seen again. LRU keeps each page ~16
    # references, too short for the hot ones. After some fits, prefix-lhd
    # keeps first-seen pages (class 0) a short time and reused ones long.
    index = TierIndex(16, "prefix-lhd")
    policy, fresh = index.policy, 10_000
    for step in range(3000):
        hot = key(step % 20) if step % 20 < 4 else None
        k = hot or key(fresh + step)
        if k in index:
            index.touch((k,))
            continue
        if index.num_free == 0:
            index.evict(1)
        index.insert(k, step)
    t_new, t_reused = policy.retention[0], policy.retention[1]
    assert t_new < 20 <= t_reused
    assert all(key(h) in index for h in range(4))
    index.check_integrity()
