"""The pools' shared budget, in process: a pool a client pinned keeps its freed slots'
memory, so it counts every slot it ever used, and evicting from it frees nothing."""

from __future__ import annotations

import hashlib

from controller.config import ControllerConfig
from controller.daemon.pools import PoolRegistry
from kvstore.layout import KVLayout

LAYOUT_A = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, page_size=8, dtype="float16")
LAYOUT_B = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, page_size=16, dtype="float16")


def keys(tag: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}{i}".encode(), digest_size=16).digest() for i in range(n)]


def store(pool, tag: str, n: int) -> int:
    chain = keys(tag, n)
    plan = pool.core.begin_store(chain)
    return pool.core.commit_store(chain, plan)


def test_a_pinned_pool_counts_every_slot_it_used():
    budget = 16 * LAYOUT_A.page_bytes
    registry = PoolRegistry(ControllerConfig(), budget)
    try:
        pinned = registry.pool_for("t", LAYOUT_A)
        pinned.core.pool.returns_memory = False      # as after a client's pins_memory Hello
        assert store(pinned, "a", 12) == 12
        pinned.core.host.evict(12)                   # its pages go; their memory stays
        assert pinned.used_slots == 0
        assert pinned.used_bytes == 12 * LAYOUT_A.page_bytes
        assert pinned.new_bytes(12) == 0             # reusing its own slots costs nothing new
        other = registry.pool_for("t", LAYOUT_B)     # pages twice as large
        # 4 A-pages of budget are left: 2 B-pages fit, and the pinned pool is not asked.
        stored = store(other, "b", 6)
        assert stored == 2
        assert registry.used_bytes <= budget
        assert pinned.used_bytes == 12 * LAYOUT_A.page_bytes
    finally:
        registry.close(flush_deadline_s=None)
