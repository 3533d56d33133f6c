"""A hybrid (Mamba) model's HiCache through kvstore, driven by SGLang 0.5.23's own code on
CPU (``sglang_stack.HiCacheRank(mamba=True)``): its ``MambaPoolHost`` and MHA host pool in
one ``HostPoolGroup``, its ``HybridCacheController`` with the backend attached from the
README's JSON, the controller's backup thread (``batch_set_v2`` for the state, v1 for the
pages), its hit query (``batch_exists_v2`` with the Mamba tree component's placeholder
transfer, TRAILING_PAGES), its sidecar load after the KV pages (``_sync_trailing_keys`` then
``batch_get_v2``). What stands in for the engine: the KV and state bytes (drawn from the page
hash) and the tree cache's slot allocation. Every loaded state is compared bit for bit
(a float32 SSM state and a bfloat16 conv state) with what its writer held."""

import json

import pytest
import torch

from sglang_stack import (CONV_SHAPE, MAMBA_LAYERS, PAGE, SSM_SHAPE, HiCacheRank, page_hashes,
                          page_kv, readme_extra_config)
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer
from test_sglang_engine import assert_loaded

from adapters.sglang.side_pools import state_layout
from controller.config import ConfigError

pytestmark = pytest.mark.sglang

A = list(range(2000, 2014))             # 3 full pages + 2 tokens
B = A[:12] + list(range(50, 62))         # A's 3 pages, then 3 more


def state_of(page_hash: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba state after the page ``page_hash`` (SSM float32, conv bfloat16)."""
    gen = torch.Generator().manual_seed(int(page_hash[:15], 16) ^ 0x5A5A)
    return (torch.randn((MAMBA_LAYERS, *SSM_SHAPE), generator=gen),
            torch.randn((MAMBA_LAYERS, *CONV_SHAPE), generator=gen).to(torch.bfloat16))


def make(request, mem_layout="page_first", **extra) -> HiCacheRank:
    extra.setdefault("kvstore_embedded_name", request.node.name)
    rank = HiCacheRank(mem_layout, False, readme_extra_config(**extra), mamba=True)
    request.addfinalizer(rank.close)
    return rank


def backup_with_state(rank: HiCacheRank, tokens) -> None:
    """Back a prompt up with the state at its last full page; both groups must be written."""
    state = state_of(page_hashes(tokens)[-1])
    assert rank.backup(tokens, state=state) == len(tokens) // PAGE * PAGE
    assert rank.last_backup.pool_storage_result.extra_pool_hit_pages.get(PoolName.MAMBA) == 1


def assert_state(got, page_hash: str) -> None:
    want = state_of(page_hash)
    assert got is not None, "the hit came without its Mamba state"
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("mem_layout", ["page_first", "page_first_direct", "layer_first"])
def test_state_round_trips_with_its_pages(request, mem_layout):
    """Writer and reader are two engines' controllers on one embedded cache."""
    writer, reader = make(request, mem_layout), make(request, mem_layout)
    assert reader.prefetch_hybrid(A)[0] == 0
    backup_with_state(writer, A)
    loaded, rows, state = reader.prefetch_hybrid(A)
    assert loaded == 12
    assert_loaded(reader, A, rows, 3)
    assert_state(state, page_hashes(A)[2])


def test_hit_only_where_a_state_entry_exists(request):
    """B's 6 pages are all cached once B is stored, but between A's state (page 3) and B's
    (page 6) a hit of 4 or 5 pages has no state: the hit rule answers 3 and 6, never 4/5."""
    rank = make(request)
    backup_with_state(rank, A)
    # B's pages without a state (a request whose state backup was not taken): pages 4-6
    # are cached, but the hit stops at A's state.
    assert rank.backup(B) == 24
    loaded, rows, state = rank.prefetch_hybrid(B)
    assert loaded == 12
    assert_state(state, page_hashes(B)[2])
    query = rank.backend.batch_exists_v2(
        page_hashes(B), [PoolTransfer(name=PoolName.MAMBA, keys=["x"],
                                      hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert query.kv_hit_pages == 3 and query.restorable_prefix_pages == [3]
    backup_with_state(rank, B)
    query = rank.backend.batch_exists_v2(
        page_hashes(B), [PoolTransfer(name=PoolName.MAMBA, keys=["x"],
                                      hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert query.restorable_prefix_pages == [3, 6]
    loaded, rows, state = rank.prefetch_hybrid(B)
    assert loaded == 24
    assert_loaded(rank, B, rows, 6)
    assert_state(state, page_hashes(B)[5])


def test_a_state_without_its_pages_is_no_hit(request):
    """All-or-nothing from the read side: a state entry whose pages are gone (here: never
    stored, as when the KV backup failed after SGLang wrote the sidecar) is unreachable;
    a dense request (no side pool) still hits the pages it has."""
    rank = make(request)
    hashes = page_hashes(B)
    slot = rank.mamba_host.alloc(1)
    rank.write_state(int(slot[0]), state_of(hashes[5]))
    flags = rank.backend.batch_set_v2([PoolTransfer(name=PoolName.MAMBA, host_indices=slot,
                                                    keys=[hashes[5]])])
    assert flags[PoolName.MAMBA] == [True]
    assert rank.prefetch_hybrid(B)[0] == 0
    backup_with_state(rank, A)
    assert rank.prefetch_hybrid(B)[0] == 12


def test_state_entries_are_chained_to_the_prefix(request):
    """The state's key is chained to the KV page key (namespace + SGLang's chained hash):
    another model name never sees it, and the entry lives in a cache of its own layout."""
    writer = make(request)
    other = make(request, kvstore_model_id="another-model")
    backup_with_state(writer, A)
    assert other.prefetch_hybrid(A)[0] == 0
    side = writer.backend._side["mamba"]
    nbytes = MAMBA_LAYERS * (4 * torch.Size(SSM_SHAPE).numel() + 2 * torch.Size(CONV_SHAPE).numel())
    assert side.layout == state_layout(nbytes)
    assert side.layout != writer.backend.layout
    assert side.cache.count_cached(side.entry_keys(writer.backend._keys(page_hashes(A)[2:3]))) == 1
    assert side.cache.count_cached(side.entry_keys(writer.backend._keys(page_hashes(A)[1:2]))) == 0


def test_state_comes_back_from_kvstore_l3(request, tmp_path):
    """A state evicted from kvstore's L2 (a host pool of 4 slots per layout, then other
    prompts) comes back from the disk L3 bit for bit, with its pages."""
    l3 = {"connector": "disk", "options": {"path": str(tmp_path), "capacity_bytes": 1 << 24}}
    rank = make(request, kvstore_host_pool_pages=4, kvstore_l3=l3)
    backup_with_state(rank, A)
    for start in (3000, 4000, 5000, 6000):   # push A's pages and state out of kvstore's L2
        backup_with_state(rank, list(range(start, start + 12)))
    reader = make(request, kvstore_host_pool_pages=4, kvstore_l3=l3)   # another engine, one cache
    loaded, rows, state = reader.prefetch_hybrid(A)
    assert loaded == 12
    assert_loaded(reader, A, rows, 3)
    assert_state(state, page_hashes(A)[2])
    assert rank.backend.cache_stats().num_l3_hit_pages >= 3
    assert rank.backend._side["mamba"].cache.stats().num_l3_hit_pages >= 1
    assert (tmp_path.parent / (tmp_path.name + ".side-mamba")).is_dir()


# ---- sliding-window models: the SWA pool's last window, page by page --------------------------
WINDOW = 2


def window_kv(page_hash: str) -> torch.Tensor:
    """The SWA layers' KV of a page (drawn from the hash, unlike its full-attention KV)."""
    return page_kv(page_hash[-15:], False)


def test_swa_window_round_trips_and_the_hit_needs_the_whole_window(request):
    """A (3 pages) stored with its window (pages 1, 2), B (6 pages) with pages 4, 5: the
    restorable prefixes are 3 and 6; a hit of 4 or 5 pages would miss window pages.
    Loaded window pages equal what the writer held, bit for bit."""
    def rank():
        r = HiCacheRank("page_first", False, readme_extra_config(
            kvstore_embedded_name=request.node.name), side_pool=PoolName.SWA)
        request.addfinalizer(r.close)
        return r
    writer, reader = rank(), rank()
    assert writer.backup_window(A, WINDOW, window_kv) == 12
    assert writer.last_backup.pool_storage_result.extra_pool_hit_pages.get(PoolName.SWA) == WINDOW
    assert writer.backup_window(B, WINDOW, window_kv) == 24
    query = reader.backend.batch_exists_v2(page_hashes(B), [PoolTransfer(
        name=PoolName.SWA, keys=["x"] * WINDOW, hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert query.restorable_prefix_pages == [3, 6]
    for tokens, pages in ((B, 6), (A, 3)):
        loaded, rows, window = reader.prefetch_window(tokens, WINDOW)
        assert loaded == pages * PAGE
        assert_loaded(reader, tokens, rows, pages)
        assert window is not None, "the hit came without its window"
        for i, h in enumerate(page_hashes(tokens)[pages - WINDOW: pages]):
            assert torch.equal(reader.read_window_page(int(window[i * PAGE])), window_kv(h))


def test_a_mamba_pool_that_is_not_sglangs_mamba_host_pool_is_refused(request):
    extra = readme_extra_config(kvstore_embedded_name=request.node.name)
    with pytest.raises(ConfigError, match="not a MambaPoolHost"):
        HiCacheRank("page_first", False, extra, side_pool=PoolName.MAMBA)


# ---- daemon mode: one daemon per layout (pages, states) ----------------------------------------
def state_round_trip(request, urls: dict) -> None:
    """One rank backs A up with its state; another, of the other host layout, loads both."""
    writer, reader = make(request, **urls), make(request, "page_first_direct", **urls)
    backup_with_state(writer, A)
    loaded, rows, state = reader.prefetch_hybrid(A)
    assert loaded == 12
    assert_loaded(reader, A, rows, 3)
    assert_state(state, page_hashes(A)[2])


def test_ranks_share_states_through_live_daemons(request, tmp_path):
    """Two engines' ranks on two `kvstore serve` daemons: one for the KV pages' layout, one
    for the state entries' (named by kvstore_side_urls). Without the second URL the attach
    fails and says what to set."""
    from daemon_proc import DaemonProcess

    probe = make(request, kvstore_embedded_name="probe")
    for d in ("kv", "states"):
        (tmp_path / d).mkdir()
    kv = DaemonProcess(tmp_path / "kv", layout=probe.backend.layout, host_pages=16).start()
    request.addfinalizer(kv.stop)
    states = DaemonProcess(tmp_path / "states", layout=probe.backend._side["mamba"].layout,
                           host_pages=8).start()
    request.addfinalizer(states.stop)
    with pytest.raises(ConfigError, match="kvstore_side_urls"):
        HiCacheRank("page_first", False, readme_extra_config(kvstore_url=kv.address), mamba=True)
    urls = {"kvstore_url": kv.address, "kvstore_side_urls": {"mamba": states.address}}
    state_round_trip(request, urls)
    assert states.stats()["num_stored_pages"] == 1 and states.stats()["num_leases"] == 0


def test_a_daemon_of_every_layout_serves_pages_and_states(request, tmp_path):
    """A daemon started without --layout-*: the pages and the Mamba states are two pools of
    it, reached through kvstore_url alone."""
    from daemon_proc import DaemonProcess

    (tmp_path / "run").mkdir()
    daemon = DaemonProcess(tmp_path, layout=None, args=["--host-pool-bytes", "256M"]).start()
    request.addfinalizer(daemon.stop)
    urls = {"kvstore_url": daemon.address}
    state_round_trip(request, urls)
    assert len(json.loads(daemon.stats()["pools"])) == 2
