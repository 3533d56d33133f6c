"""The adaptive policy: switching rule by hand, safety by property, choice by workload."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.eviction import DEFAULT_POLICY, make_policy
from kvstore.eviction.adaptive import AdaptivePolicy, key_hash, pick_leader
from kvstore.index.tier_index import TierIndex


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def adaptive(experts: tuple[str, ...], half_life: float = 200.0) -> AdaptivePolicy:
    """Every key sampled, decisions on a short window: switching visible in small tests."""
    return AdaptivePolicy(experts, sample_rate=1.0, half_life=half_life, min_sample_pages=1)


def run(index: TierIndex, stream) -> None:
    """Replay single-page references: hit -> touch, miss -> evict one if full, insert."""
    for i in stream:
        k = key(i)
        if k in index:
            index.touch((k,))
            continue
        if index.num_free == 0:
            assert index.evict(1)
        index.insert(k, i)


# ---- the switching rule, by hand --------------------------------------------
SCORES = [100.0, 130.0, 90.0]


def ahead(won: float, lost: float) -> list[list[float]]:
    """Discordant counts between expert 1 (the best score) and expert 0 (the leader)."""
    table = [[0.0] * 3 for _ in range(3)]
    table[1][0], table[0][1] = won, lost
    return table


def test_a_clear_lead_switches() -> None:
    # gap 40 - 10 = 30 > 0.02 * 100 and 30**2 = 900 > 3**2 * (40 + 10) = 450
    assert pick_leader(SCORES, ahead(40, 10), leader=0, min_gain=0.02, z=3.0) == 1


def test_a_lead_within_noise_does_not_switch() -> None:
    # gap 30, but 30**2 = 900 <= 3**2 * (70 + 40) = 990: could be chance
    assert pick_leader(SCORES, ahead(70, 40), leader=0, min_gain=0.02, z=3.0) == 0


def test_a_lead_below_the_minimum_gain_does_not_switch() -> None:
    # gap 30 is significant (900 > 9 * 30 = 270) but not above 0.5 * 100 = 50 hits
    assert pick_leader(SCORES, ahead(30, 0), leader=0, min_gain=0.5, z=3.0) == 0


def test_the_leader_stays_when_it_scores_best_or_ties() -> None:
    assert pick_leader(SCORES, ahead(40, 10), leader=1, min_gain=0.0, z=0.0) == 1
    tied = [130.0, 130.0, 90.0]
    assert pick_leader(tied, ahead(40, 10), leader=0, min_gain=0.0, z=0.0) == 0


def test_the_hash_samples_counter_keys_evenly() -> None:
    # Trace keys are little-endian counters: a rate of 1/8 must pick ~1/8 of them.
    sampled = sum(key_hash(key(i)) < 2**32 // 8 for i in range(80_000))
    assert 9_000 < sampled < 11_000


# ---- it follows the right expert --------------------------------------------
def test_on_a_shifting_working_set_it_leaves_lfu_for_lru() -> None:
    # Phase A loops over 24 pages long enough for LFU to rank them high;
    # phase B loops over 24 others. In 32 pages LFU keeps A and B thrashes in
    # the 8 pages left; LRU holds all of B after one pass.
    policy = adaptive(("lfu", "lru"))
    index = TierIndex(32, policy)
    run(index, [i % 24 for i in range(2_000)])
    run(index, [100 + i % 24 for i in range(3_000)])
    assert policy.leader == "lru"
    assert [name for _, name in policy.followed()] == ["lfu", "lru"]
    index.check_integrity()


def test_with_a_hot_set_under_a_scan_it_leaves_lru_for_lfu() -> None:
    # 20 hot pages take 30% of the references, the rest are never reused:
    # a hot page comes back after ~67 references, more than LRU's 32 pages
    # hold, while LFU keeps the hot ones (their counts) and lets scans pass.
    rng = random.Random(7)
    stream, fresh = [], 1_000
    for _ in range(6_000):
        if rng.random() < 0.3:
            stream.append(rng.randrange(20))
        else:
            fresh += 1
            stream.append(fresh)
    policy = adaptive(("lru", "lfu"))
    index = TierIndex(32, policy)
    run(index, stream)
    assert policy.leader == "lfu"
    index.check_integrity()


def test_it_is_the_default_and_starts_with_its_first_expert() -> None:
    assert DEFAULT_POLICY == "adaptive"
    policy = make_policy("adaptive")
    assert policy.leader == "prefix-lhd" and policy.followed() == [(0, "prefix-lhd")]
    policy.set_capacity(10_000)  # large enough for every expert's miniature
    assert set(policy.scores()) >= {"prefix-lhd", "prefix-slru", "lru"}


def test_a_tier_too_small_for_its_miniatures_keeps_its_first_expert_without_a_guard() -> None:
    # 1,000 pages at 1/128: 8-page miniatures, below the 64-page floor.
    policy = AdaptivePolicy(("lfu", "lru"), half_life=200.0, guard=None)
    index = TierIndex(1_000, policy)
    run(index, [i % 900 for i in range(5_000)])
    run(index, [10_000 + i % 900 for i in range(20_000)])  # LRU wins this, by far
    assert policy.followed() == [(0, "lfu")]
    assert policy.num_shadow_keys() == (0, 0)  # nothing sampled


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        AdaptivePolicy(("lru", "lru"))
    with pytest.raises(ValueError):
        AdaptivePolicy(("lru",), sample_rate=0.0)


# ---- it never breaks the tier's rules, whoever it follows -------------------
OPS = st.lists(st.tuples(st.sampled_from(["req", "lease", "release"]),
                         st.integers(0, 11), st.integers(1, 4)), max_size=120)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, experts=st.permutations(["lru", "s3fifo", "arc", "prefix-slru", "prefix-lhd"]))
def test_capacity_prefix_rule_and_leases_hold(ops, experts) -> None:
    # Requests are chains (session s, pages 0..depth-1) inserted under their
    # parent, as the controller does; z = 0 and a tiny window make it switch
    # whenever another expert's miniature is ahead, so every expert gets a turn.
    policy = AdaptivePolicy(tuple(experts), sample_rate=1.0, min_gain=0.0, z=0.0, half_life=16,
                            min_sample_pages=1)
    index = TierIndex(6, policy)
    leased: list[bytes] = []
    for op, session, depth in ops:
        chain = [key(1_000 * session + d) for d in range(depth)]
        if op == "lease" and chain[0] in index:
            index.lease([chain[0]])
            leased.append(chain[0])
            continue
        if op == "release" and leased:
            index.release([leased.pop()])
            continue
        parent = None
        for k in chain:
            if k in index:
                index.touch((k,))
            else:
                victims = index.evict(1) if index.num_free == 0 else []
                for victim, _ in victims:  # a leaf: its next page (child) is not cached
                    assert key(int.from_bytes(victim, "little") + 1) not in index
                if index.num_free == 0:
                    break  # all leaves leased: the request stores no more
                index.insert(k, 0, parent)
            parent = k
        index.check_integrity()
        assert len(index) <= 6
        assert all(k in index for k in leased)


# ---- what the default costs -------------------------------------------------
def test_the_default_experts_are_the_five_candidates() -> None:
    policy = make_policy("adaptive")
    policy.set_capacity(10_000)
    assert set(policy.scores()) == {"prefix-lhd", "prefix-slru", "lru", "s3fifo", "arc"}


def test_key_zero_is_not_always_sampled() -> None:
    # Block id 0 is the shared root of every chain in Mooncake traces; a hash
    # that maps it to 0 would sample it at any rate.
    assert key_hash(key(0)) >= 2**32 // 64


def test_shadow_state_stays_under_a_tenth_of_the_tier() -> None:
    # 10,000 pages at the default rate: five 78-page miniatures with their ghosts.
    # Chains of 4 pages over 6,000 sessions, a third of them revisited: every
    # miniature fills and every ghost list reaches its bound.
    rng = random.Random(3)
    policy = make_policy("adaptive")
    index = TierIndex(10_000, policy)
    for step in range(40_000):
        session = rng.randrange(6_000) if step % 3 == 0 else 10_000 + step
        parent = None
        for depth in range(4):
            k = key(session * 8 + depth)
            if k in index:
                index.touch((k,))
            else:
                if index.num_free == 0:
                    assert index.evict(1)
                index.insert(k, 0, parent)
            parent = k
    cached, with_ghosts = policy.num_shadow_keys()
    assert 0 < cached <= with_ghosts <= 0.10 * len(index)
    index.check_integrity()


# ---- small tiers: the LRU guard ---------------------------------------------
def test_a_small_tier_leaves_its_first_expert_for_the_guard_when_lru_wins() -> None:
    # 1,000 pages: too small for the five miniatures, so the first expert (LFU)
    # runs against an LRU miniature. Phase B's loop fits in the tier but LFU
    # keeps phase A's pages: LRU wins by far, and the guard follows it.
    policy = AdaptivePolicy(("lfu", "lru"), half_life=2_000.0)
    index = TierIndex(1_000, policy)
    run(index, [i % 900 for i in range(5_000)])
    run(index, [10_000 + i % 900 for i in range(30_000)])
    assert [name for _, name in policy.followed()] == ["lfu", "lru"]
    assert set(policy.scores()) == {"lfu", "lru"}  # now LFU is the challenger
    index.check_integrity()


def test_a_small_tier_keeps_its_first_expert_when_it_beats_the_guard() -> None:
    # A hot set under a scan (LFU's case): the guard never moves the tier.
    rng = random.Random(5)
    stream, fresh = [], 100_000
    for _ in range(40_000):
        if rng.random() < 0.3:
            stream.append(rng.randrange(1_500))
        else:
            fresh += 1
            stream.append(fresh)
    policy = AdaptivePolicy(("lfu", "lru"), half_life=2_000.0)
    index = TierIndex(1_000, policy)
    run(index, stream)
    assert policy.followed() == [(0, "lfu")]


def test_a_small_tiers_shadow_state_stays_under_a_tenth() -> None:
    # 5,000 pages: the guard's LRU miniature holds 9% of the tier, no ghosts.
    policy = make_policy("adaptive")
    index = TierIndex(5_000, policy)
    run(index, [i % 20_000 for i in range(60_000)])
    cached, total = policy.num_shadow_keys()
    assert 0 < cached and total <= 500
    assert set(policy.scores()) == {"prefix-lhd", "lru"}


def test_the_guard_must_be_an_expert() -> None:
    with pytest.raises(ValueError):
        AdaptivePolicy(("lfu", "arc"))  # guard "lru" not among them
    AdaptivePolicy(("lfu", "arc"), guard=None)
