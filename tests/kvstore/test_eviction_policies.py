"""What each policy is for, in small narrated scenarios (the shared contract is in test_eviction.py)."""

from __future__ import annotations

from kvstore.tier_index import TierIndex

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
