"""Every policy must find a victim while unleased pages exist, whatever is leased."""

import pytest

from kvstore.eviction import policy_names
from kvstore.index.tier_index import TierIndex


def key(i: int) -> bytes:
    return bytes([i]) * 16


@pytest.mark.parametrize("policy", policy_names())
def test_a_leased_newcomer_does_not_block_eviction(policy):
    index = TierIndex(10, policy)
    for i in range(9):
        index.insert(key(i), i)
    index.touch([key(i) for i in range(9)])
    assert len(index.evict(1)) == 1
    index.insert(key(9), 9)  # the newest page, leased as a lookup leases what it fetched
    index.lease([key(9)])
    for _ in range(8):
        victims = index.evict(1)
        assert len(victims) == 1 and victims[0][0] != key(9)
        index.check_integrity()
    assert index.evict(1) == []
