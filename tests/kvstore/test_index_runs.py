"""The run tree under the TierIndex: runs (radix nodes) against a plain dict model."""

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvstore.index.runs import RunTree
from kvstore.index.tier_index import TierIndex, TierIndexError


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chain_index(n: int, capacity: int = 64, policy: str = "lru") -> TierIndex:
    index = TierIndex(capacity, policy)
    for i in range(n):
        index.insert(key(i), 100 + i, key(i - 1) if i else None)
    return index


def test_a_chain_is_one_run_and_a_branch_cuts_it():
    index = chain_index(6)
    assert index.num_runs == 1
    index.insert(key(50), 50, parent=key(2))  # branch after page 2: [0 1 2] -> [3 4 5], [50]
    assert index.num_runs == 3
    assert index.match_prefix([key(0), key(1), key(2), key(50), key(51)]) == 4
    assert index.match_prefix([key(0), key(1), key(2), key(3), key(4), key(5)]) == 6
    index.check_integrity()


def test_a_filled_gap_joins_the_runs():
    index = TierIndex(16, "prefix-lru")
    for i in (3, 4, 5):
        index.insert(key(i), i, key(i - 1))  # key(2) is not cached: the run waits for it
    index.insert(key(0), 0)
    index.insert(key(1), 1, key(0))
    assert index.num_runs == 2
    index.insert(key(2), 2, key(1))
    assert index.num_runs == 1
    assert index.slots_of([key(i) for i in range(6)]) == list(range(6))
    index.check_integrity()


def test_a_lease_ending_inside_a_run_protects_exactly_its_pages():
    index = chain_index(8, capacity=8)
    index.lease([key(i) for i in range(5)])  # pages 0..4 of the run 0..7
    assert [index.lease_count(key(i)) for i in range(8)] == [1] * 5 + [0] * 3
    evicted = index.evict(3)  # LRU: oldest first, leased pages skipped
    assert sorted(k for k, _ in evicted) == sorted(key(i) for i in (5, 6, 7))
    assert index.evict(1) == []
    index.release([key(i) for i in range(5)])
    index.check_integrity()


def test_a_refused_release_changes_nothing():
    index = chain_index(4)
    index.lease([key(0), key(1)])
    with pytest.raises(TierIndexError):
        index.release([key(0), key(1), key(1)])
    assert index.lease_count(key(0)) == 1 and index.lease_count(key(1)) == 1
    with pytest.raises(TierIndexError):
        index.lease([key(0), key(9)])
    assert index.lease_count(key(0)) == 1


def test_removing_the_middle_of_a_run_splits_it():
    index = chain_index(6)
    index.remove(key(2))
    assert index.match_prefix([key(i) for i in range(6)]) == 2
    assert index.match_prefix([key(3), key(4), key(5)]) == 3
    index.insert(key(2), 2, key(1))
    assert index.num_runs == 1
    index.check_integrity()


class RunTreeMachine(RuleBasedStateMachine):
    """Random chains with branches, gaps, late parents and removals; the tree must agree
    with a dict of key -> (slot, parent) on membership, slots and prefix matches."""

    CAPACITY = 24

    def __init__(self):
        super().__init__()
        self.tree = RunTree(self.CAPACITY)
        self.model: dict[bytes, int] = {}
        self.parent: dict[bytes, bytes | None] = {}  # a key always has the same parent

    def _parent_of(self, i: int, parent: int) -> bytes | None:
        k = key(i)
        if k not in self.parent:
            self.parent[k] = None if parent >= i else key(parent)
        return self.parent[k]

    @rule(i=st.integers(0, 40), parent=st.integers(0, 40), slot=st.integers(0, 999))
    def add(self, i, parent, slot):
        k = key(i)
        if k in self.model or len(self.model) >= self.CAPACITY:
            return
        self.tree.add(k, slot, self._parent_of(i, parent))
        self.model[k] = slot

    @rule(i=st.integers(0, 40))
    def remove(self, i):
        if key(i) in self.model:
            self.tree.remove(key(i))
            del self.model[key(i)]

    @rule(start=st.integers(0, 40), length=st.integers(0, 12))
    def match_a_chain(self, start, length):
        # the chain that ends at `start`, walked back through the recorded parents
        chain, k = [], key(start)
        while k is not None and len(chain) < length:
            chain.append(k)
            k = self.parent.get(k)
        chain.reverse()
        expected = next((j for j, c in enumerate(chain) if c not in self.model), len(chain))
        assert self.tree.match_prefix(chain) == expected
        entries = self.tree.entries_of(chain[:expected])
        assert [int(self.tree.slot[e]) for e in entries] == [self.model[c] for c in chain[:expected]]

    @rule(keys=st.lists(st.integers(0, 40), max_size=6))
    def match_any_keys(self, keys):
        ks = [key(i) for i in keys]
        expected = next((j for j, c in enumerate(ks) if c not in self.model), len(ks))
        assert self.tree.match_prefix(ks) == expected

    @invariant()
    def consistent(self):
        assert self.tree.check() is None
        assert len(self.tree) == len(self.model)


TestRunTreeMachine = RunTreeMachine.TestCase
TestRunTreeMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_remove_many_trims_a_chain_from_its_tail_as_remove_per_key_would():
    keys = [bytes([i]) * 16 for i in range(10)]
    branch = [bytes([100 + i]) * 16 for i in range(3)]
    trees = [RunTree(32), RunTree(32)]
    for tree in trees:
        tree.add_chain(keys, list(range(10)), None)
        tree.add_chain(branch, [20, 21, 22], keys[5])      # a branch after page 5: a split
    # Peel the main chain from its tail past the branch point, then a page of the branch.
    victims = keys[9:5:-1] + [branch[2]] + [keys[0]]
    freed = trees[0].remove_many(victims)
    assert freed == [trees[1].remove(k) for k in victims]
    for tree in trees:
        assert tree.check() is None
    assert trees[0].entry_of == trees[1].entry_of and trees[0]._free_entries == trees[1]._free_entries
    assert trees[0].match_prefix(keys) == trees[1].match_prefix(keys) == 0
    assert trees[0].match_prefix(keys[1:6] + branch) == 7
