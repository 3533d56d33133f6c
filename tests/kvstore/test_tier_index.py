import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.eviction import policy_names
from kvstore.index.tier_index import TierIndex, TierIndexError


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def filled(capacity: int, n: int) -> TierIndex:
    index = TierIndex(capacity, "lru")
    for i in range(n):
        index.insert(key(i), i, key(i - 1) if i else None)
    return index


def test_match_prefix_stops_at_the_first_gap():
    index = filled(8, 4)
    index.remove(key(2))
    assert index.match_prefix([key(0), key(1), key(2), key(3)]) == 2
    assert index.match_prefix([key(5)]) == 0
    assert index.match_prefix([]) == 0


def test_lru_evicts_the_least_recently_used_first():
    index = filled(4, 4)
    index.touch([key(0)])
    assert index.evict(2) == [(key(1), 1), (key(2), 2)]
    index.check_integrity()


def test_evict_frees_n_or_nothing_and_skips_leased_pages():
    index = filled(3, 3)
    index.lease([key(0), key(1)])
    assert index.evict(2) == []
    assert len(index) == 3
    assert index.evict(1) == [(key(2), 2)]
    index.release([key(0)])
    assert index.evict(1) == [(key(0), 0)]


def test_capacity_is_never_exceeded():
    index = filled(2, 2)
    with pytest.raises(TierIndexError, match="full"):
        index.insert(key(9), 9)
    with pytest.raises(TierIndexError, match="already"):
        index.insert(key(0), 0)


def test_leases_nest_and_guard_removal():
    index = filled(2, 1)
    index.lease([key(0)])
    index.lease([key(0)])
    index.release([key(0)])
    with pytest.raises(TierIndexError, match="leased"):
        index.remove(key(0))
    index.release([key(0)])
    with pytest.raises(TierIndexError, match="no lease"):
        index.release([key(0)])
    with pytest.raises(TierIndexError, match="not in the index"):
        index.lease([key(7)])
    assert index.remove(key(0)) == 0


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match="lru"):
        TierIndex(4, "no-such-policy")


class LRUIndexMachine(RuleBasedStateMachine):
    """The index against a plain list model of LRU order, with leases."""

    def __init__(self):
        super().__init__()
        self.index = TierIndex(5, "lru")
        self.order: list[int] = []  # least recent first
        self.leases: dict[int, int] = {}

    @rule(i=st.integers(0, 9))
    def insert_or_touch(self, i):
        if i in self.order:
            self.index.touch([key(i)])
            self.order.remove(i)
        else:
            if len(self.order) == 5:
                victims = self.index.evict(1)
                unleased = [k for k in self.order if k not in self.leases]
                if not unleased:
                    assert victims == []
                    return
                assert victims == [(key(unleased[0]), unleased[0])]
                self.order.remove(unleased[0])
            self.index.insert(key(i), i)
        self.order.append(i)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def lease(self, data):
        i = data.draw(st.sampled_from(self.order))
        self.index.lease([key(i)])
        self.leases[i] = self.leases.get(i, 0) + 1

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.sampled_from(sorted(self.leases)))
        self.index.release([key(i)])
        self.leases[i] -= 1
        if not self.leases[i]:
            del self.leases[i]

    @rule(n=st.integers(1, 3))
    def evict(self, n):
        unleased = [k for k in self.order if k not in self.leases]
        victims = self.index.evict(n)
        if len(unleased) < n:
            assert victims == []
        else:
            assert [s for _, s in victims] == unleased[:n]
            for v in unleased[:n]:
                self.order.remove(v)

    @invariant()
    def consistent(self):
        self.index.check_integrity()
        assert sorted(self.index.slots_of(key(i) for i in self.order)) == sorted(self.order)
        assert len(self.index) == len(self.order) <= 5


TestLRUIndexMachine = LRUIndexMachine.TestCase
TestLRUIndexMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("policy", [p for p in policy_names()
                                    if p.startswith("prefix-") or p == "adaptive"])
def test_a_parent_that_arrives_after_its_child_is_linked_to_it(policy):
    index = TierIndex(8, policy)
    index.insert(key(0), 0)
    index.insert(key(2), 2, parent=key(1))  # key(1) is not cached (yet)
    index.insert(key(1), 1, parent=key(0))  # the gap is filled, e.g. from L3
    index.touch([key(2)])  # the child is the most recent page, but the only leaf
    assert index.evict(1) == [(key(2), 2)]
    index.check_integrity()


def test_a_child_waiting_for_its_parent_can_leave_first():
    index = TierIndex(8, "prefix-slru")
    index.insert(key(2), 2, parent=key(1))
    index.remove(key(2))
    index.insert(key(1), 1)
    index.check_integrity()
    assert index.evict(1) == [(key(1), 1)]


@pytest.mark.parametrize("policy", [p for p in policy_names()
                                    if p.startswith("prefix-") or p == "adaptive"])
def test_a_parent_that_leaves_and_comes_back_is_linked_again(policy):
    index = TierIndex(3, policy)
    index.insert(key(1), 1)
    index.insert(key(2), 2, parent=key(1))
    index.remove(key(1))  # e.g. discarded; key(2) stays cached
    index.insert(key(1), 1)
    index.touch([key(2)])
    index.touch([key(2)])
    index.insert(key(3), 3)
    victims = index.evict(1)
    assert victims and victims[0][0] != key(1)  # key(1) has a cached child again
    index.check_integrity()


def test_lease_prefix_is_match_prefix_then_lease_in_one_walk():
    one, two = TierIndex(16), TierIndex(16)
    keys = [bytes([i]) * 16 for i in range(6)]
    for index in (one, two):
        index.insert_chain(keys[:4], [10, 11, 12, 13])
        index.insert(keys[5], 15, keys[4])          # after a gap: not in the prefix
    num_hit, slots = one.lease_prefix(keys)
    assert num_hit == two.match_prefix(keys) == 4
    assert slots.tolist() == two.lease(keys[:4]) == [10, 11, 12, 13]
    assert [one.lease_count(k) for k in keys] == [two.lease_count(k) for k in keys] == [1, 1, 1, 1, 0, 0]
    assert one.lease_prefix([keys[4]])[0] == 0 and one.lease_count(keys[5]) == 0
    one.release(keys[:4])
    one.check_integrity()
