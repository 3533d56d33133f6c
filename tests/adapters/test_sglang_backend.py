"""KVStoreHiCacheStorage driven as SGLang 0.5.23 drives it: built by SGLang's own
StorageBackendFactory ("dynamic" backend) from its HiCacheStorageConfig, the host
pool registered, then batch_exists / batch_get_v1 / batch_set_v1 and the older
get/set calls, with page hashes and host indices as SGLang passes them.

Two "ranks" are two backends (as two engine processes would hold) on one cache:
replicas of one model share pages, two TP ranks of an MHA model do not, TP ranks
of an MLA model do (and only the storage writer writes)."""

import json

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="SGLang is not installed "
                    "(scripts/setup_adapters.sh)")
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from sglang_host_pools import FakeHostPool  # noqa: E402

pytestmark = pytest.mark.sglang

P = 4  # tokens per page


def storage_config(name, tp_rank=0, tp_size=1, is_mla=False, **extra):
    extra_config = {"backend_name": "kvstore", "module_path": "adapters.sglang.backend",
                    "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
                    "kvstore_url": "embedded", "kvstore_embedded_name": name,
                    "kvstore_host_pool_pages": 16, **extra}
    # What SGLang parses from --hicache-storage-backend-extra-config.
    extra_config = json.loads(json.dumps(extra_config))
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1,
                                attn_cp_rank=0, attn_cp_size=1, is_mla_model=is_mla,
                                enable_storage_metrics=True, is_page_first_layout=False,
                                model_name="tiny-llama", extra_config=extra_config)


def make_rank(request, mem_layout="layer_first", is_mla=False, **cfg):
    pool = FakeHostPool(mem_layout, is_mla=is_mla, page_size=P)
    config = storage_config(request.node.name, is_mla=is_mla, **cfg)
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    backend.register_mem_pool_host(pool)  # what HiCacheController does next
    request.addfinalizer(backend.close)
    return backend, pool


def host_indices(pages):
    """Token rows of whole pages, as SGLang's controller passes them."""
    return torch.cat([torch.arange(p * P, (p + 1) * P) for p in pages])


HASHES = [f"{i:064x}" for i in range(1, 5)]  # SGLang page hashes are sha256 hex strings


@pytest.mark.parametrize("mem_layout,is_mla", [
    ("layer_first", False), ("page_first", False), ("page_first_direct", False),
    ("page_head", False), ("layer_first", True), ("page_first", True), ("page_first_direct", True)])
def test_round_trip_between_replicas(request, mem_layout, is_mla):
    writer, pool_a = make_rank(request, mem_layout, is_mla)
    reader, pool_b = make_rank(request, mem_layout, is_mla)
    pool_a.fill_random(3)
    assert writer.batch_exists(HASHES) == 0
    assert writer.batch_set_v1(HASHES[:3], host_indices([0, 1, 2])) == [True] * 3
    # The reader sees 3 of 4 pages and loads them into other host pages of its own pool.
    assert reader.batch_exists(HASHES) == 3
    assert reader.batch_get_v1(HASHES, host_indices([5, 3, 4, 1])) == [True, True, True, False]
    for src, dst in [(0, 5), (1, 3), (2, 4)]:
        assert torch.equal(pool_a.get_data_page(src * P), pool_b.get_data_page(dst * P))
    assert torch.all(pool_b.get_data_page(1 * P) == 0)  # the miss was not written


def test_tp_ranks_of_mha_do_not_share(request):
    rank0, pool0 = make_rank(request, tp_rank=0, tp_size=2)
    rank1, _ = make_rank(request, tp_rank=1, tp_size=2)
    pool0.fill_random(4)
    assert rank0.batch_set_v1(HASHES, host_indices([0, 1, 2, 3])) == [True] * 4
    assert rank0.batch_exists(HASHES) == 4
    assert rank1.batch_exists(HASHES) == 0


def test_tp_ranks_of_mla_share_and_only_the_writer_writes(request):
    rank1, pool1 = make_rank(request, "page_first", is_mla=True, tp_rank=1, tp_size=2)
    rank0, pool0 = make_rank(request, "page_first", is_mla=True, tp_rank=0, tp_size=2)
    pool0.fill_random(5)
    pool1.fill_random(6)
    assert rank1.batch_set_v1(HASHES, host_indices([0, 1, 2, 3])) == [True] * 4
    assert rank0.batch_exists(HASHES) == 0  # rank 1 is not the storage writer
    assert rank0.batch_set_v1(HASHES, host_indices([0, 1, 2, 3])) == [True] * 4
    assert rank1.batch_get_v1(HASHES, host_indices([2, 3, 4, 5])) == [True] * 4
    assert torch.equal(pool1.get_data_page(5 * P), pool0.get_data_page(3 * P))


def test_models_and_salts_do_not_share(request):
    a, pool_a = make_rank(request)
    b, _ = make_rank(request, kvstore_model_id="other-model")
    c, _ = make_rank(request, kvstore_cache_salt="tenant-2")
    pool_a.fill_random(7)
    a.batch_set_v1(HASHES, host_indices([0, 1, 2, 3]))
    assert (a.batch_exists(HASHES), b.batch_exists(HASHES), c.batch_exists(HASHES)) == (4, 0, 0)


def test_older_get_set_calls_with_flat_pages(request):
    a, pool_a = make_rank(request, "page_first")
    b, pool_b = make_rank(request, "page_first")
    pool_a.fill_random(8)
    pages = [pool_a.flat_in_sglang_order(p * P).clone() for p in range(2)]
    assert a.batch_set(HASHES[:2], pages) is True
    assert a.exists(HASHES[0]) and not a.exists(HASHES[3])
    dummies = [torch.zeros_like(pages[0]) for _ in range(3)]
    got = b.batch_get(HASHES[:3], dummies)
    assert got[2] is None and all(torch.equal(g, p) for g, p in zip(got[:2], pages))
    assert torch.equal(b.get(HASHES[1], torch.zeros_like(pages[0])), pages[1])


def test_stats_sglang_polls(request):
    a, pool_a = make_rank(request)
    a.batch_set_v1(HASHES, host_indices([0, 1, 2, 3]))
    a.batch_get_v1(HASHES[:2], host_indices([4, 5]))
    metrics = a.get_stats()
    assert (metrics.backup_pgs, metrics.prefetch_pgs) == ([4], [2])
    assert metrics.backup_bandwidth[0] > 0 and metrics.prefetch_bandwidth[0] > 0
    assert a.get_stats().backup_pgs == []  # drained by the poll
    assert a.cache_stats().num_stored_pages == 4


def test_pages_come_back_from_kvstore_l3(request, tmp_path):
    l3 = {"connector": "disk", "options": {"path": str(tmp_path / "l3"), "capacity_bytes": 1 << 24}}
    a, pool_a = make_rank(request, kvstore_host_pool_pages=2, kvstore_l3=l3)
    pool_a.fill_random(9)
    hashes = [f"{i:064x}" for i in range(100, 106)]
    assert a.batch_set_v1(hashes[:2], host_indices([0, 1])) == [True, True]
    assert a.batch_set_v1(hashes[2:4], host_indices([2, 3])) == [True, True]  # evicts 0, 1 to L3
    assert a.batch_exists(hashes[:2]) == 2  # read back from L3 into kvstore's L2
    assert a.batch_get_v1(hashes[:2], host_indices([4, 5])) == [True, True]
    assert torch.equal(pool_a.get_data_page(4 * P), pool_a.get_data_page(0))
    assert a.cache_stats().num_l3_hit_pages >= 2


def test_two_ranks_share_pages_through_a_live_daemon(request, tmp_path):
    """Daemon mode: two engine processes' backends (here two handles) on one daemon."""
    from adapters.sglang.host_layout import layout_of
    from daemon_proc import DaemonProcess

    layout = layout_of(FakeHostPool("layer_first", page_size=P))
    daemon = DaemonProcess(tmp_path, layout=layout, host_pages=16).start()
    request.addfinalizer(daemon.stop)
    writer, pool_a = make_rank(request, kvstore_url=daemon.address)
    reader, pool_b = make_rank(request, kvstore_url=daemon.address)
    other_tp, _ = make_rank(request, tp_rank=1, tp_size=2, kvstore_url=daemon.address)
    pool_a.fill_random(11)
    assert writer.batch_set_v1(HASHES[:3], host_indices([0, 1, 2])) == [True] * 3
    assert reader.batch_exists(HASHES) == 3
    assert other_tp.batch_exists(HASHES) == 0          # another TP rank: another namespace
    assert reader.batch_get_v1(HASHES[:3], host_indices([3, 4, 5])) == [True] * 3
    for src, dst in [(0, 3), (1, 4), (2, 5)]:
        assert torch.equal(pool_a.get_data_page(src * P), pool_b.get_data_page(dst * P))
    stats = daemon.stats()
    assert stats["num_stored_pages"] == 3 and stats["num_leases"] == 0
    daemon.check_integrity(quiescent=True)
