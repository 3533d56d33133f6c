"""The EvictionPolicy contract, held for every registered policy (see kvstore/eviction/base.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.eviction import DEFAULT_POLICY, EvictionPolicy, make_policy, policy_names
from kvstore.index.tier_index import TierIndex

ALL = policy_names()
PREFIX_AWARE = [n for n in ALL if n.startswith("prefix-")]


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def filled(name: str, n: int, chained: bool = False) -> EvictionPolicy:
    """A policy tracking keys 0..n-1 (independent pages, or one chain), some of them hit."""
    policy = make_policy(name)
    policy.set_capacity(n)
    for i in range(n):
        policy.on_insert(key(i), key(i - 1) if chained and i else None)
        if i % 3 == 0:
            policy.on_access(key(i))
    return policy


def test_registry_lists_every_policy_and_the_default() -> None:
    assert {"lru", "lfu", "s3fifo", "arc", "prefix-lru", "prefix-lfuda", "prefix-slru"} <= set(ALL)
    assert DEFAULT_POLICY in ALL
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("no-such-policy")


@pytest.mark.parametrize("name", ALL)
def test_policy_name_matches_registry(name: str) -> None:
    assert make_policy(name).name == name


@pytest.mark.parametrize("name", ALL)
def test_choose_victims_names_n_distinct_tracked_evictable_keys(name: str) -> None:
    policy = filled(name, 20)
    tracked = {key(i) for i in range(20)}
    evictable = lambda k: int.from_bytes(k, "little") % 2 == 0  # noqa: E731
    for n in (1, 3, 5):
        victims = policy.choose_victims(n, evictable)
        assert len(victims) == n and len(set(victims)) == n
        assert set(victims) <= tracked and all(evictable(k) for k in victims)
    assert len(policy) == 20


@pytest.mark.parametrize("name", ALL)
def test_choose_victims_is_all_or_nothing(name: str) -> None:
    policy = filled(name, 5)
    assert policy.choose_victims(6, lambda k: True) == []
    assert policy.choose_victims(1, lambda k: False) == []
    assert len(policy) == 5


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("chained", [False, True])
def test_choose_victims_twice_agrees(name: str, chained: bool) -> None:
    policy = filled(name, 30, chained)
    first = policy.choose_victims(4, lambda k: True)
    assert policy.choose_victims(4, lambda k: True) == first


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("chained", [False, True])
def test_remove_forgets_keys_and_reinsert_works(name: str, chained: bool) -> None:
    policy = filled(name, 10, chained)
    for victim in policy.choose_victims(10, lambda k: True):
        policy.on_remove(victim)
    assert len(policy) == 0
    assert policy.choose_victims(1, lambda k: True) == []
    policy.on_insert(key(3), None)
    assert policy.choose_victims(1, lambda k: True) == [key(3)]


@pytest.mark.parametrize("name", PREFIX_AWARE)
def test_prefix_aware_policies_only_offer_leaves(name: str) -> None:
    # Two chains under one root: 0 -> 1 -> 2 and 0 -> 3; the root is hit most.
    policy = make_policy(name)
    policy.set_capacity(4)
    for k, parent in ((0, None), (1, 0), (2, 1), (3, 0)):
        policy.on_insert(key(k), key(parent) if parent is not None else None)
    for k in (0, 0, 1, 2):
        policy.on_access(key(k))
    order = policy.choose_victims(4, lambda k: True)
    position = {int.from_bytes(k, "little"): i for i, k in enumerate(order)}
    assert position[2] < position[1] < position[0] and position[3] < position[0]


# ---- every policy through the real index: random operations, checked invariants ----
OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "touch", "evict", "lease", "release", "remove"]),
              st.integers(0, 40), st.integers(1, 4)),
    max_size=120,
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_index_invariants_hold_under_random_operations(name: str, ops) -> None:
    capacity = 8
    index = TierIndex(capacity, name)
    leased: dict[bytes, int] = {}
    for op, k, n in ops:
        kk = key(k)
        if op == "insert" and kk not in index:
            if index.num_free == 0 and not index.evict(1):
                continue  # everything leased
            index.insert(kk, k, key(k - 1) if k else None)
        elif op == "touch" and kk in index:
            index.touch([kk])
        elif op == "evict":
            before = len(index)
            removed = index.evict(n)
            assert len(removed) in (0, n) and len(index) == before - len(removed)
            assert not any(key_ in leased for key_, _ in removed)
        elif op == "lease" and kk in index:
            index.lease([kk])
            leased[kk] = leased.get(kk, 0) + 1
        elif op == "release" and kk in leased:
            index.release([kk])
            leased[kk] -= 1
            if not leased[kk]:
                del leased[kk]
        elif op == "remove" and kk in index and kk not in leased:
            index.remove(kk)
        index.check_integrity()
        assert len(index) <= capacity


@pytest.mark.parametrize("name", PREFIX_AWARE)
@settings(max_examples=40, deadline=None)
@given(chains=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=40))
def test_prefix_aware_policies_never_evict_a_parent_of_a_cached_page(name: str, chains) -> None:
    """Replaying chains (paths in a small tree), no victim ever has a cached child."""
    index = TierIndex(6, name)
    parent_of: dict[bytes, bytes | None] = {}
    for path in chains:
        parent = None
        node: tuple[int, ...] = ()
        for step in path:
            node = node + (step,)
            kk = key(int.from_bytes(repr(node).encode()[:16].ljust(16, b"."), "little"))
            parent_of[kk] = parent
            if kk in index:
                index.touch([kk])
            else:
                if index.num_free == 0:
                    cached_parents = {parent_of[k] for k, _ in index.items() if parent_of[k] in index}
                    (victim, _), = index.evict(1)
                    assert victim not in cached_parents, "evicted a page whose child is cached"
                index.insert(kk, 0, parent)
            parent = kk
        index.check_integrity()
