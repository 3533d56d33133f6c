"""The ``auto`` prefetch policy inside the embedded controller: what a lookup hands out
follows the cost model, and stats() shows each choice."""

import torch

from controller.config import ControllerConfig, L3Config, PrefetchConfig
from controller.embedded import EmbeddedController
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
PAGE = LAYOUT.page_size


def make(host_pages=8, **prefetch):
    config = ControllerConfig(host_pool_pages=host_pages,
                              l3=L3Config("memory", {}, write_policy="write_back", timeout_s=5.0),
                              prefetch=PrefetchConfig(policy="auto", batch_pages=2, **prefetch))
    pool = torch.randn(LAYOUT.pool_shape(64), generator=torch.Generator().manual_seed(7))
    return EmbeddedController(config, KeyNamespace("auto-model", LAYOUT), pool)


def tokens(n_pages, base=0):
    return list(range(base, base + n_pages * PAGE))


def spill_to_l3(ctl, n_pages=6):
    """Store chain A, then enough of chain B that A leaves L2 for L3; returns A's tokens."""
    a = tokens(n_pages)
    ctl.store(a, list(range(n_pages)))
    ctl.store(tokens(8, base=10_000), list(range(10, 18)))
    assert ctl.drain_backups(5.0)
    assert ctl.stats().num_l3_written_pages >= n_pages
    return a


def test_l2_hit_loads_every_page_and_counts_it():
    ctl = make()
    try:
        ctl.store(tokens(4), [0, 1, 2, 3])
        ctl.report_prefill(4 * PAGE, 0, 1.0)         # a slow engine: loading pays
        result = ctl.lookup(tokens(4) + [1, 2])
        assert (result.num_l2_pages, result.num_l3_pages) == (4, 0)
        stats = ctl.stats()
        assert (stats.num_loaded_l2_pages, stats.num_loaded_l3_pages) == (4, 0)
        assert stats.num_recomputed_by_choice_pages == 0
        ctl.release(result)
        ctl.check_integrity(quiescent=True)
    finally:
        ctl.close()


def test_l3_pages_load_when_recompute_is_slower():
    ctl = make()
    try:
        a = spill_to_l3(ctl)
        ctl.report_prefill(4 * PAGE, 0, 10.0)        # ~0.6 s a token: any L3 read pays
        result = ctl.lookup(a)
        assert result.num_hit_pages == 6 and result.num_l3_pages == 6
        stats = ctl.stats()
        assert stats.num_loaded_l3_pages == 6 and stats.num_recomputed_by_choice_pages == 0
        ctl.release(result)
        ctl.check_integrity(quiescent=True)
    finally:
        ctl.close()


def test_l3_pages_are_recomputed_when_the_engine_is_faster():
    ctl = make()
    try:
        a = spill_to_l3(ctl)
        b = tokens(6, base=20_000)
        ctl.store(b, list(range(20, 26)))             # a second chain, for measuring L3 first
        ctl.store(tokens(8, base=30_000), list(range(30, 38)))
        assert ctl.drain_backups(5.0)
        ctl.report_prefill(4 * PAGE, 0, 1e-9)        # recompute is (nearly) free
        ctl.release(ctl.lookup(b))                    # L3 unmeasured: a bounded exploring wait
        ctl.prefetch(b).wait(5.0)
        assert ctl._core.cost.l3.is_known             # the prefetch measured its reads
        result = ctl.lookup(a)
        assert result.num_hit_pages == 0
        stats = ctl.stats()
        assert stats.num_recomputed_by_choice_pages >= 6
        ctl.check_integrity()
    finally:
        ctl.close()


def test_a_fixed_policy_still_waits_and_counts_what_it_loads():
    config = ControllerConfig(host_pool_pages=8, l3=L3Config("memory", {}, timeout_s=5.0),
                              prefetch=PrefetchConfig(policy="wait_complete", batch_pages=2))
    pool = torch.zeros(LAYOUT.pool_shape(64))
    ctl = EmbeddedController(config, KeyNamespace("auto-model", LAYOUT), pool)
    try:
        a = spill_to_l3(ctl)
        ctl.report_prefill(4 * PAGE, 0, 1e-9)        # ignored by wait_complete
        result = ctl.lookup(a)
        assert result.num_l3_pages == 6
        assert ctl.stats().num_loaded_l3_pages == 6 and ctl.stats().num_recomputed_by_choice_pages == 0
        ctl.release(result)
    finally:
        ctl.close()


def test_backup_writes_and_existence_checks_feed_the_model():
    """Before any read, the backup's writes give the L3 rates (a prior the stats do not
    report as reads); the written pages are known to be in L3 (``presence``), and an
    existence check from a page the cache did not know tells the share such gaps hold."""
    ctl = make()
    try:
        a = spill_to_l3(ctl)
        cost = ctl._core.cost
        assert cost.l3.num_writes > 0 and cost.l3.is_from_writes and cost.l3.num_reads == 0
        assert cost.l3.latency_s >= 0 and cost.l3.seconds_per_mb > 0
        assert ctl.stats().l3_read_gbps == 0.0
        assert cost.exists_yield.value is None
        keys_a = ctl._keys(a + tokens(6, base=50_000))
        assert cost.num_known(keys_a) == 6   # the backup wrote A: known, its new tail not
        # A's 6 pages in L3, then a tail of 6 pages that was never stored: the check
        # starts at a known page, so it is not a sample of the unknown pages' share.
        ticket = ctl.prefetch(a + tokens(6, base=50_000))
        assert ticket.wait(5.0) and ticket.num_ready == 6
        assert cost.exists_yield.value is None
        assert cost.l3.num_reads > 0 and not cost.l3.is_from_writes
        # A prompt that was never stored: its check starts at an unknown page and finds none.
        assert ctl.prefetch(tokens(4, base=70_000)).wait(5.0)
        assert cost.exists_yield.value == 0.0
    finally:
        ctl.close()
