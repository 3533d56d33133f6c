import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvstore.host_pool import HostPool
from kvstore.index.host_store import HostStore
from kvstore.layout import KVLayout
from kvstore.index.tier_index import TierIndexError

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2, dtype="float32")


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def store():
    evicted = []
    pool = HostPool(LAYOUT, 3)
    s = HostStore(pool, "lru", on_evict=lambda keys, slots: evicted.append(
        [(k, pool.tensor[slot].clone()) for k, slot in zip(keys, slots)]))
    s.evicted = evicted
    yield s
    pool.close()


def write(store, keys, value):
    slots = store.reserve(len(keys))
    assert slots is not None
    for slot in slots:
        store.pool.tensor[slot].fill_(value)
    store.commit(keys, slots, [None] * len(keys))
    return slots


def test_eviction_hook_sees_the_bytes_before_the_slot_is_reused(store):
    write(store, [key(0), key(1), key(2)], 1.0)
    write(store, [key(3)], 2.0)
    [batch] = store.evicted
    assert batch[0][0] == key(0)
    assert torch.all(batch[0][1] == 1.0)
    assert store.match_prefix([key(1), key(2), key(3)]) == 3
    store.check_integrity()


def test_leased_pages_survive_and_a_full_leased_store_refuses(store):
    write(store, [key(0), key(1), key(2)], 1.0)
    slots = store.lease([key(0), key(1), key(2)])
    assert store.reserve(1) is None
    store.release([key(1)])
    assert store.reserve(1) == [slots[1]]
    store.abort([slots[1]])
    store.check_integrity()


def test_a_failing_eviction_hook_still_frees_the_slots():
    pool = HostPool(LAYOUT, 2)

    def broken_spill(keys, slots):
        raise OSError("disk gone")

    store = HostStore(pool, "lru", on_evict=broken_spill)
    write(store, [key(0), key(1)], 1.0)
    with pytest.raises(OSError):
        store.reserve(1)
    store.check_integrity()
    assert store.reserve(1) is not None  # the slot came back
    pool.close()


def test_refused_release_and_discard_change_nothing(store):
    write(store, [key(0), key(1)], 1.0)
    store.lease([key(0)])
    with pytest.raises(TierIndexError, match="no lease"):
        store.release([key(0), key(0)])
    with pytest.raises(TierIndexError, match="absent or leased"):
        store.discard([key(1), key(0)])
    store.check_integrity()
    assert key(1) in store.index and store.index.lease_count(key(0)) == 1
    store.release([key(0)])
    store.check_integrity(quiescent=True)


class HostStoreMachine(RuleBasedStateMachine):
    """Random writes, leases and releases; pool, index and leases must always agree."""

    def __init__(self):
        super().__init__()
        self.pool = HostPool(LAYOUT, 4)
        self.store = HostStore(self.pool, "lru")
        self.held: list[list[bytes]] = []

    @rule(keys=st.lists(st.integers(0, 12), min_size=1, max_size=3, unique=True))
    def write(self, keys):
        new = [key(k) for k in keys if key(k) not in self.store.index]
        slots = self.store.reserve(len(new))
        if slots is not None:
            self.store.commit(new, slots, [None] * len(new))

    @rule(keys=st.lists(st.integers(0, 12), min_size=1, max_size=3, unique=True))
    def lease_present(self, keys):
        present = [key(k) for k in keys if key(k) in self.store.index]
        self.store.lease(present)
        self.held.append(present)

    @rule(keys=st.lists(st.integers(0, 12), min_size=1, max_size=3, unique=True))
    def discard_unleased(self, keys):
        gone = [key(k) for k in keys if key(k) in self.store.index and not self.store.index.is_leased(key(k))]
        self.store.discard(gone)
        assert all(k not in self.store.index for k in gone)

    @rule()
    def release_oldest(self):
        if self.held:
            self.store.release(self.held.pop(0))

    @invariant()
    def integrity(self):
        self.store.check_integrity()
        assert len(self.store.index) <= self.store.capacity

    def teardown(self):
        self.pool.close()


TestHostStoreMachine = HostStoreMachine.TestCase
TestHostStoreMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
