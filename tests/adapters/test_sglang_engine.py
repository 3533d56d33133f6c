"""kvstore as SGLang 0.5.23's HiCache storage backend, driven through SGLang's own code
on CPU (``sglang_stack``: its device and host pools, its ``HybridCacheController`` and
threads, the README's extra-config JSON): every host layout, both interfaces (zero-copy
v1 and the older get/set with flat pages), writers and readers in any mix of layout and
interface, embedded and through a live daemon. Every loaded byte is checked against the
KV the writer's page held.

Two ranks are two engine processes' controllers on one cache (one embedded cache by
name, or one daemon)."""

import itertools

import pytest
import torch

from sglang_stack import (ALL_LAYOUTS, MHA_LAYOUTS, MLA_LAYOUTS, PAGE, HiCacheRank, page_hashes,
                          page_kv, readme_extra_config)
from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

from controller.config import ConfigError

from adapters.sglang.host_layout import flat_page_view, layout_of, page_view

pytestmark = pytest.mark.sglang

INTERFACES = {"v1": 1, "getset": 0}
PROMPT = list(range(1000, 1014))        # 3 full pages of 4 tokens + 2 tokens
LONGER = PROMPT[:12] + list(range(7, 17))  # the same 3 pages, then 2 pages never stored


def make_rank(request, mem_layout="page_first", is_mla=False, interface="v1", *,
              tp_rank=0, tp_size=1, **extra) -> HiCacheRank:
    extra.setdefault("kvstore_embedded_name", request.node.name)
    rank = HiCacheRank(mem_layout, is_mla,
                       readme_extra_config(interface_v1=INTERFACES[interface], **extra),
                       tp_rank=tp_rank, tp_size=tp_size)
    request.addfinalizer(rank.close)
    return rank


def assert_loaded(reader: HiCacheRank, tokens, host_rows: torch.Tensor, num_pages: int) -> None:
    """Each loaded host page holds, bit for bit, the KV its writer held for that hash."""
    assert host_rows.numel() >= num_pages * PAGE
    for i, page_hash in enumerate(page_hashes(tokens)[:num_pages]):
        got = reader.read_page(int(host_rows[i * PAGE]))
        want = page_kv(page_hash, reader.is_mla)
        assert torch.equal(got, want), (f"page {i} read by {reader.mem_layout} differs from "
                                        f"what was written ({(got != want).sum()} values)")


def round_trip(writer: HiCacheRank, reader: HiCacheRank) -> None:
    assert writer.backup(PROMPT) == 12
    loaded, rows = reader.prefetch(LONGER)
    assert loaded == 12, "the 3 stored pages are a hit, the 2 others are not"
    assert_loaded(reader, LONGER, rows, 3)


# ---- both interfaces, every layout ---------------------------------------------------------
@pytest.mark.parametrize("interface", INTERFACES)
def test_sglang_picks_the_interface_from_the_extra_config(request, interface):
    rank = make_rank(request, interface=interface)
    expect = "_page_get_zero_copy" if interface == "v1" else "_generic_page_get"
    assert rank.controller.page_get_func.__name__ == expect


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("mem_layout,is_mla", ALL_LAYOUTS)
def test_round_trip(request, mem_layout, is_mla, interface):
    writer = make_rank(request, mem_layout, is_mla, interface)
    reader = make_rank(request, mem_layout, is_mla, interface)
    assert reader.prefetch(PROMPT)[0] == 0
    round_trip(writer, reader)


def _modes(layouts):
    return [(m, i) for m in layouts for i in INTERFACES]


MIXED = [(w, r, False) for w, r in itertools.product(_modes(MHA_LAYOUTS), repeat=2) if w != r] + \
        [(w, r, True) for w, r in itertools.product(_modes(MLA_LAYOUTS), repeat=2) if w != r]


@pytest.mark.parametrize("writer_mode,reader_mode,is_mla", MIXED,
                         ids=[f"{'mla' if m else 'mha'}-{w[0]}-{w[1]}-to-{r[0]}-{r[1]}"
                              for w, r, m in MIXED])
def test_any_writer_any_reader(request, writer_mode, reader_mode, is_mla):
    """A page stored from one host layout or interface reads back right in any other."""
    writer = make_rank(request, writer_mode[0], is_mla, writer_mode[1])
    reader = make_rank(request, reader_mode[0], is_mla, reader_mode[1])
    round_trip(writer, reader)


# ---- the page views against SGLang's own accessors ----------------------------------------
@pytest.mark.parametrize("mem_layout,is_mla", ALL_LAYOUTS)
def test_test_kv_placement_agrees_with_sglang_per_layer_views(request, mem_layout, is_mla):
    """The tests' own placement of a page (sglang_stack._HOST_AXES) against the per-layer
    views SGLang's transfer code uses, where the layout has them."""
    if mem_layout == ("page_first_direct" if is_mla else "page_head"):
        pytest.skip("SGLang's per-layer list of this pool holds pages, not layers")
    rank = make_rank(request, mem_layout, is_mla)
    pool, page = rank.host_pool, page_kv("ab" * 32, is_mla)
    rank.write_page(2 * PAGE, page)
    refs = [pool.data_refs] if is_mla else [pool.k_data_refs, pool.v_data_refs]
    for kv, per_layer in enumerate(refs):
        for layer in range(page.shape[0]):
            rows = per_layer[layer].reshape(-1, *per_layer[layer].shape[-2:])[2 * PAGE: 3 * PAGE]
            assert torch.equal(rows, page[layer, kv])


@pytest.mark.parametrize("mem_layout,is_mla", ALL_LAYOUTS)
def test_flat_pages_are_in_the_host_layouts_order(request, mem_layout, is_mla):
    """SGLang's flat pages (get_data_page / set_from_flat_data_page) follow the host
    layout; flat_page_view reads and writes them as the zero-copy page view does."""
    rank = make_rank(request, mem_layout, is_mla)
    pool, layout = rank.host_pool, layout_of(rank.host_pool)
    view = page_view(pool.kv_buffer, mem_layout, layout)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=torch.Generator().manual_seed(4)))
    for page in (0, 3):
        flat = pool.get_data_page(page * PAGE)
        assert torch.equal(flat_page_view(flat, mem_layout, layout), view[page])
    dummy = pool.get_dummy_flat_data_page()
    flat_page_view(dummy, mem_layout, layout).copy_(view[3])
    pool.set_from_flat_data_page(5 * PAGE, dummy)
    assert torch.equal(view[5], view[3])


def test_a_flat_page_of_another_pool_is_refused(request):
    rank = make_rank(request, "page_first")
    layout = layout_of(rank.host_pool)
    with pytest.raises(ValueError, match="does not come from the host pool"):
        flat_page_view(torch.zeros(layout.page_bytes // 4 - 1), "page_first", layout)
    with pytest.raises(ValueError, match="page_head"):
        flat_page_view(torch.zeros(layout.page_bytes // 4), "page_unified", layout)


# ---- hybrid models: side pools other than Mamba / SWA are refused ----------------------------
# (Mamba and SWA side pools are served: tests/adapters/test_sglang_hybrid.py)
@pytest.mark.parametrize("side_pool", [PoolName.INDEXER, PoolName.DRAFT])
def test_a_hybrid_models_side_pool_fails_sglangs_attach(request, side_pool):
    """SGLang's controller registers every host pool with the backend as it attaches it;
    kvstore refuses a side pool it cannot store there, so the engine does not start with a
    cache that would serve KV without its state, and says what to do."""
    extra = readme_extra_config(kvstore_embedded_name=request.node.name)
    with pytest.raises(ConfigError, match=f"'{side_pool.value}' host pool.*without --hicache-storage-backend"):
        HiCacheRank("page_first", False, extra, side_pool=side_pool)


def test_side_pool_transfers_are_misses_if_sglang_asks_anyway(request):
    """Were a transfer for a side pool this backend does not hold to reach it (SGLang's hit
    query with a hybrid request's extra pools), it is a miss: the KV pages alone are never
    served for it."""
    rank = make_rank(request)
    assert rank.backup(PROMPT) == 12
    swa = PoolTransfer(name=PoolName.SWA, keys=page_hashes(PROMPT))
    assert rank.prefetch(PROMPT, extra_pools=[swa])[0] == 0
    assert rank.prefetch(PROMPT)[0] == 12


# ---- namespaces: who shares pages -----------------------------------------------------------
def test_tp_ranks_of_mha_do_not_share(request):
    rank0 = make_rank(request, tp_rank=0, tp_size=2)
    rank1 = make_rank(request, tp_rank=1, tp_size=2)
    assert rank0.backup(PROMPT) == 12
    assert rank1.prefetch(PROMPT)[0] == 0
    assert rank0.prefetch(PROMPT)[0] == 12


def test_tp_ranks_of_mla_share_and_only_the_writer_writes(request):
    rank1 = make_rank(request, "page_first", True, tp_rank=1, tp_size=2)
    rank0 = make_rank(request, "layer_first", True, "getset", tp_rank=0, tp_size=2)
    rank1.backup(PROMPT)                        # SGLang skips backup on a non-writer rank
    assert rank0.prefetch(PROMPT)[0] == 0
    assert rank0.backup(PROMPT) == 12
    loaded, rows = rank1.prefetch(PROMPT)
    assert loaded == 12
    assert_loaded(rank1, PROMPT, rows, 3)


def test_models_and_salts_do_not_share(request):
    a = make_rank(request)
    b = make_rank(request, kvstore_model_id="other-model")
    c = make_rank(request, kvstore_cache_salt="tenant-2")
    a.backup(PROMPT)
    assert (a.prefetch(PROMPT)[0], b.prefetch(PROMPT)[0], c.prefetch(PROMPT)[0]) == (12, 0, 0)


# ---- metrics and kvstore's own L3 -------------------------------------------------------------
def test_stats_sglang_polls(request):
    rank = make_rank(request)
    rank.backup(PROMPT)
    rank.prefetch(PROMPT[:8])
    metrics = rank.backend.get_stats()
    assert (metrics.backup_pgs, metrics.prefetch_pgs) == ([3], [2])
    assert metrics.backup_bandwidth[0] > 0 and metrics.prefetch_bandwidth[0] > 0
    assert rank.backend.get_stats().backup_pgs == []  # drained by the poll
    assert rank.backend.cache_stats().num_stored_pages == 3


@pytest.mark.parametrize("interface", INTERFACES)
def test_pages_come_back_from_kvstore_l3(request, tmp_path, interface):
    l3 = {"connector": "disk", "options": {"path": str(tmp_path / "l3"), "capacity_bytes": 1 << 24}}
    rank = make_rank(request, "page_head", interface=interface, kvstore_host_pool_pages=2,
                     kvstore_l3=l3)
    other = list(range(5000, 5008))
    assert rank.backup(PROMPT[:8]) == 8
    assert rank.backup(other) == 8              # kvstore's L2 holds 2 pages: 0 and 1 go to L3
    loaded, rows = rank.prefetch(PROMPT[:8])
    assert loaded == 8
    assert_loaded(rank, PROMPT[:8], rows, 2)
    assert rank.backend.cache_stats().num_l3_hit_pages >= 2


# ---- daemon mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("is_mla", [False, True], ids=["mha", "mla"])
def test_ranks_share_pages_through_a_live_daemon(request, tmp_path, is_mla):
    """Two engine processes' ranks (writer: get/set, page_first; reader: v1, another
    layout) on one `kvstore serve` daemon; a third rank of another TP shard sees nothing."""
    from daemon_proc import DaemonProcess

    writer_layout, reader_layout = ("page_first", "layer_first") if is_mla else ("page_first", "page_head")
    probe = make_rank(request, writer_layout, is_mla, kvstore_embedded_name="probe")
    daemon = DaemonProcess(tmp_path, layout=layout_of(probe.host_pool), host_pages=16).start()
    request.addfinalizer(daemon.stop)
    writer = make_rank(request, writer_layout, is_mla, "getset", kvstore_url=daemon.address)
    reader = make_rank(request, reader_layout, is_mla, "v1", kvstore_url=daemon.address)
    round_trip(writer, reader)
    if not is_mla:
        other_tp = make_rank(request, reader_layout, is_mla, tp_rank=1, tp_size=2,
                             kvstore_url=daemon.address)
        assert other_tp.prefetch(PROMPT)[0] == 0
    stats = daemon.stats()
    assert stats["num_stored_pages"] == 3 and stats["num_leases"] == 0
    daemon.check_integrity(quiescent=True)


def test_a_slot_reused_during_the_copy_is_a_miss_from_that_page(request, monkeypatch):
    """The fence in SGLang's v1 get: a page whose kvstore slot changed owner while it was
    copied into SGLang's host pool (another writer was handed the slot) is reported as
    not loaded, with every page after it; SGLang recomputes them."""
    import adapters.sglang.backend as backend_module

    writer = make_rank(request)
    reader = make_rank(request)
    assert writer.backup(PROMPT) == 12
    cache = reader.backend._require_cache()
    real_copy = backend_module.slots_to_pages

    def copy_then_reuse(host, slots, view, pages):
        real_copy(host, slots, view, pages)
        cache.generations[slots[1]] += 1      # page 1's slot went to another writer meanwhile
    monkeypatch.setattr(backend_module, "slots_to_pages", copy_then_reuse)
    loaded, rows = reader.prefetch(PROMPT)
    assert loaded == PAGE, "only page 0 is vouched for"
    assert_loaded(reader, PROMPT, rows, 1)
