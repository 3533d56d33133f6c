"""The prefetch (L3 -> L2) and backup (L2 -> L3) pipelines of the controller core.

L3 here is the real in-memory connector (or the disk store); a *gate* holds its
raw reads or writes on the L3 loop so a test can act while an I/O is in flight.
"""

import asyncio
import threading
import time

import pytest
import torch

from controller.api import CacheError
from controller.config import ControllerConfig, L3Config, PrefetchConfig
from controller.embedded import EmbeddedController
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, page_keys

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
NAMESPACE = KeyNamespace("pipeline-model", LAYOUT)
NUM_DEVICE_PAGES = 64
PAGE = LAYOUT.page_size


def make(host_pages=8, policy="wait_complete", write_policy="write_back", l3="memory", l3_options=None,
         **l3_fields):
    options = dict(l3_options or {})
    config = ControllerConfig(
        host_pool_pages=host_pages,
        l3=L3Config(l3, options, write_policy=write_policy, timeout_s=5.0, **l3_fields),
        prefetch=PrefetchConfig(policy=policy, batch_pages=2, timeout_base_s=0.05,
                                timeout_per_1k_tokens_s=0.0))
    pool = torch.randn(LAYOUT.pool_shape(NUM_DEVICE_PAGES), generator=torch.Generator().manual_seed(7))
    return EmbeddedController(config, NAMESPACE, pool), pool


def tokens(n_pages, base=0):
    return list(range(base, base + n_pages * PAGE))


class Gate:
    """Holds one raw method of the live connector until opened (on the L3 loop)."""

    def __init__(self, ctl, method):
        self.l3 = ctl._core._l3
        self.loop = ctl._core._runner.loop
        self.name = method
        self.real = getattr(self.l3, method)
        self.entered = threading.Event()
        self._open = asyncio.Event()
        self.fail = False

        async def gated(*args):
            self.entered.set()
            await self._open.wait()
            if self.fail:
                raise ConnectionError("L3 went down")
            return await self.real(*args)

        setattr(self.l3, method, gated)

    def open(self):
        self.loop.call_soon_threadsafe(self._open.set)


def fill_l3(ctl, pool, n_pages, base=0):
    """Store a chain, then push it out of L2 into L3 (write_back) with another chain."""
    ctl.store(tokens(n_pages, base), list(range(n_pages)))
    flush = ctl._core.host.capacity
    ctl.store(tokens(flush, 10_000), list(range(32, 32 + flush)))
    assert ctl.drain_backups(10)


def test_best_effort_returns_the_l2_hit_at_once_and_a_later_lookup_gets_the_rest():
    ctl, pool = make(policy="best_effort")
    fill_l3(ctl, pool, 4)
    gate = Gate(ctl, "_raw_get_many")
    result = ctl.lookup(tokens(4))
    assert (result.num_hit_pages, result.num_pending_pages) == (0, 4)
    ctl.release(result)
    ticket = ctl.prefetch(tokens(4))          # the running prefetch of this chain, still held
    assert not ticket.is_done
    gate.open()
    assert ticket.wait(10) and ticket.num_ready == 4
    again = ctl.lookup(tokens(4))
    assert (again.num_l2_pages, again.num_l3_pages) == (4, 0)   # they are L2 pages now
    ctl.load(again, [40, 41, 42, 43]).wait_all()
    assert torch.equal(pool[:, :, 40:44], pool[:, :, 0:4])
    ctl.release(again)
    ctl.check_integrity(quiescent=True)
    ctl.close()


@pytest.mark.parametrize("policy", ["wait_complete", "sync"])
def test_waiting_policies_return_every_l3_page(policy):
    ctl, pool = make(policy=policy)
    fill_l3(ctl, pool, 4)
    result = ctl.lookup(tokens(4))
    assert (result.num_l2_pages, result.num_l3_pages, result.num_pending_pages) == (0, 4, 0)
    ctl.release(result)
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_timeout_policy_takes_the_ready_prefix_when_the_budget_ends():
    ctl, pool = make(policy="timeout")
    fill_l3(ctl, pool, 4)
    gate = Gate(ctl, "_raw_get_many")
    t0 = time.monotonic()
    result = ctl.lookup(tokens(4))             # budget 50 ms: the read is held
    assert time.monotonic() - t0 < 2.0
    assert result.num_hit_pages == 0 and result.num_pending_pages == 4
    ctl.release(result)
    gate.open()
    ctl.close()


def test_cancel_mid_read_gives_slots_back_and_never_writes_them_after():
    ctl, pool = make(policy="best_effort")
    fill_l3(ctl, pool, 4)
    gate = Gate(ctl, "_raw_get_many")
    ticket = ctl.prefetch(tokens(4))
    assert gate.entered.wait(5)
    core = ctl._core
    assert core.pool.num_reserved > 0          # slots reserved for the read in flight
    cancel = threading.Thread(target=ticket.cancel)
    cancel.start()
    cancel.join(10)
    assert not cancel.is_alive() and ticket.is_done and ticket.num_ready == 0
    assert core.pool.num_reserved == 0
    ctl.check_integrity(quiescent=True)
    # The freed slots are reused by a store; the held read must never land in them.
    ctl.store(tokens(8, 50_000), list(range(48, 56)))
    before = core.pool.tensor.clone()
    gate.open()
    time.sleep(0.2)
    assert torch.equal(core.pool.tensor, before)
    ctl.close()


def test_l3_down_mid_prefetch_is_a_miss_not_an_error():
    ctl, pool = make(policy="wait_complete")
    fill_l3(ctl, pool, 4)
    gate = Gate(ctl, "_raw_get_many")
    gate.fail = True
    gate.open()
    result = ctl.lookup(tokens(4))
    assert result.num_hit_pages == 0
    ctl.release(result)
    assert ctl.stats().num_l3_errors >= 1
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_lease_released_while_its_prefetch_runs():
    ctl, pool = make(policy="best_effort", host_pages=12)
    ctl.store(tokens(2), [0, 1])
    fill_l3(ctl, pool, 6, base=1000)
    gate = Gate(ctl, "_raw_get_many")
    chain = tokens(2) + tokens(6, 1000)        # 2 pages in L2, then pages that are not
    result = ctl.lookup(tokens(2))
    ctl.release(result)
    ticket = ctl.prefetch(tokens(6, 1000))
    ctl.release(result)                        # idempotent, even with a prefetch running
    gate.open()
    assert ticket.wait(10)
    ctl.check_integrity(quiescent=True)
    assert ctl.lookup(chain).num_hit_pages == 2   # another chain: keys differ after page 2
    ctl.close()


def test_write_through_writes_every_new_page_in_the_background():
    ctl, pool = make(write_policy="write_through")
    ctl.store(tokens(3), [0, 1, 2])
    assert ctl.drain_backups(10)
    st = ctl.stats()
    assert (st.num_l3_written_pages, st.num_due_pages, st.num_backup_queue_pages) == (3, 0, 0)
    ctl.close()


def test_write_back_writes_nothing_until_eviction_or_close():
    ctl, pool = make(write_policy="write_back")
    ctl.store(tokens(3), [0, 1, 2])
    assert ctl.drain_backups(10)
    assert ctl.stats().num_l3_written_pages == 0 and ctl.stats().num_due_pages == 3
    assert ctl.close().num_written == 3


def test_write_through_selective_waits_for_n_hits():
    ctl, pool = make(write_policy="write_through_selective", selective_hits=2)
    ctl.store(tokens(3), [0, 1, 2])
    for _ in range(2):                         # stored, then one hit: not yet
        assert ctl.drain_backups(10)
        assert ctl.stats().num_l3_written_pages == 0
        ctl.release(ctl.lookup(tokens(3)))
    assert ctl.drain_backups(10)               # the second hit sends them down
    assert ctl.stats().num_l3_written_pages == 3
    ctl.release(ctl.lookup(tokens(3)))
    assert ctl.drain_backups(10)
    assert ctl.stats().num_l3_written_pages == 3   # once
    ctl.close()


def test_pages_evicted_before_their_backup_ran_are_written_whole_or_counted_dropped():
    page_bytes = LAYOUT.page_bytes
    ctl, pool = make(host_pages=4, write_policy="write_back", backup_queue_bytes=3 * page_bytes)
    gate = Gate(ctl, "_raw_put_many")
    ctl.store(tokens(4), [0, 1, 2, 3])
    ctl.store(tokens(4, 900), [4, 5, 6, 7])    # evicts all 4; only 3 fit the queue's memory
    st = ctl.stats()
    assert st.num_l3_dropped_pages == 1 and st.backup_queue_bytes == 3 * page_bytes
    gate.open()
    assert ctl.drain_backups(10)
    assert ctl.stats().num_l3_written_pages == 3
    # What was written reads back bit for bit (each page whole, from the copy at eviction).
    core = ctl._core
    keys = page_keys(NAMESPACE.digest(), tokens(4), PAGE)
    values = core._runner.run(core._l3.get(keys))
    assert sum(v is not None for v in values) == 3
    for page, value in enumerate(values):
        if value is not None:
            assert value == pool[:, :, page].contiguous().numpy().tobytes()
    ctl.close()


def test_a_page_evicted_while_its_write_is_queued_is_found_by_a_lookup():
    ctl, pool = make(host_pages=4, write_policy="write_back")
    gate = Gate(ctl, "_raw_put_many")
    ctl.store(tokens(4), [0, 1, 2, 3])
    ctl.store(tokens(4, 900), [4, 5, 6, 7])    # evicted to the backup queue; L3 write held
    result = ctl.lookup(tokens(4))             # served from the queued copies
    assert result.num_hit_pages == 4
    ctl.load(result, [20, 21, 22, 23]).wait_all()
    assert torch.equal(pool[:, :, 20:24], pool[:, :, 0:4])
    ctl.release(result)
    gate.open()
    ctl.close()


def test_prefetch_on_a_closed_client_is_refused():
    ctl, _ = make()
    ctl.close()
    with pytest.raises(CacheError, match="closed"):
        ctl.prefetch(tokens(2))


def make_holding(host_pages=8, hold_s=30.0, max_hold_fraction=0.5):
    config = ControllerConfig(
        host_pool_pages=host_pages, l3=L3Config("memory", {}, timeout_s=5.0),
        prefetch=PrefetchConfig(policy="best_effort", batch_pages=2, hold_s=hold_s,
                                max_hold_fraction=max_hold_fraction))
    pool = torch.randn(LAYOUT.pool_shape(NUM_DEVICE_PAGES), generator=torch.Generator().manual_seed(7))
    return EmbeddedController(config, NAMESPACE, pool), pool


def test_prefetched_pages_are_held_for_their_request_until_a_lookup_takes_them():
    ctl, pool = make_holding(host_pages=8)
    fill_l3(ctl, pool, 4)
    ticket = ctl.prefetch(tokens(4))
    assert ticket.wait(10) and ticket.num_ready == 4
    assert ctl.stats().num_prefetch_held_pages == 4
    ctl.store(tokens(8, 70_000), list(range(40, 48)))   # would evict them were they not held
    result = ctl.lookup(tokens(4))
    assert result.num_hit_pages == 4
    assert ctl.stats().num_prefetch_held_pages == 0      # the lookup took them over
    ctl.release(result)
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_holds_end_by_time_by_cancel_and_past_their_share_of_l2():
    ctl, pool = make_holding(host_pages=8, hold_s=0.2)
    fill_l3(ctl, pool, 2)
    assert ctl.prefetch(tokens(2)).wait(10)
    time.sleep(0.3)
    ctl.release(ctl.lookup(tokens(1, 555)))             # any lookup ends expired holds
    assert ctl.stats().num_prefetch_held_pages == 0
    ctl.close()

    ctl, pool = make_holding(host_pages=8)
    fill_l3(ctl, pool, 2)
    ticket = ctl.prefetch(tokens(2))
    assert ticket.wait(10) and ctl.stats().num_prefetch_held_pages == 2
    ticket.cancel()
    assert ctl.stats().num_prefetch_held_pages == 0
    ctl.close()

    ctl, pool = make_holding(host_pages=8, max_hold_fraction=0.25)   # at most 2 held pages
    fill_l3(ctl, pool, 2)
    fill_l3(ctl, pool, 2, base=300)
    assert ctl.prefetch(tokens(2)).wait(10)
    assert ctl.prefetch(tokens(2, 300)).wait(10)
    assert ctl.stats().num_prefetch_held_pages == 2      # the older hold went
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_a_read_short_of_l2_slots_reads_on_with_the_slots_it_gets():
    # L2 of 8 pages, 3 of them leased: a 6-page chain from L3 (sync: one batch of 6) gets
    # 3 slots, then 1, then 1. Fewer slots than pages is not a break in the chain (it was
    # read as one: 3 pages, the rest recomputed).
    ctl, pool = make(host_pages=8, policy="sync")
    ctl.store(tokens(6), list(range(6)))
    ctl.store(tokens(8, base=900), list(range(10, 18)))   # A leaves L2 for L3
    assert ctl.drain_backups(5.0)
    held = ctl.lookup(tokens(3, base=900))               # 3 pages of L2 leased
    assert held.num_hit_pages == 3
    result = ctl.lookup(tokens(6))
    assert (result.num_l2_pages, result.num_l3_pages) == (0, 5)   # every free slot used
    ctl.load(result, list(range(30, 35))).wait_all()
    assert torch.equal(pool[:, :, 30:35], pool[:, :, 0:5])
    ctl.release(result)
    ctl.release(held)
    ctl.check_integrity(quiescent=True)
    ctl.close()
