"""KeyedCache (embedded) and the key map, without any engine."""

import pytest
import torch

from adapters.config import AdapterConfig
from adapters.keyed import KeyedReservation, open_keyed_cache
from adapters.keys import digest_keys
from controller.api import CacheError
from controller.config import ConfigError
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32",
                  arrangement="page_first")


def config(name, **extra):
    return AdapterConfig.from_extra({"kvstore_embedded_name": name, "kvstore_host_pool_pages": 8, **extra})


def test_keys_depend_on_namespace_and_hash():
    ns0 = KeyNamespace("m", LAYOUT, tp_rank=0, tp_size=2).digest()
    ns1 = KeyNamespace("m", LAYOUT, tp_rank=1, tp_size=2).digest()
    a, b = digest_keys(ns0, ["aa", "bb"])
    assert len(a) == 16 and a != b
    assert digest_keys(ns0, ["aa"]) == [a] and digest_keys(ns1, ["aa"]) != [a]


def test_handles_of_one_name_share_and_the_last_closes(request):
    one = open_keyed_cache(config(request.node.name), LAYOUT)
    two = open_keyed_cache(config(request.node.name), LAYOUT)
    other = open_keyed_cache(config(request.node.name + "-x"), LAYOUT)
    keys = [bytes([i]) * 16 for i in range(3)]

    def write(positions, slots):
        for p, s in zip(positions, slots):
            one.host_tensor[s].fill_(float(p + 1))

    res = one.store_keys(keys, write)
    assert res.stored_flags() == [True] * 3
    lease = two.lookup_keys(keys)
    assert lease.num_hit_pages == 3 and float(two.host_tensor[lease.slots[2]][0, 0, 0, 0, 0]) == 3.0
    two.release_keys(lease)
    assert other.count_cached(keys) == 0
    one.close()
    assert two.count_cached(keys) == 3  # still open: two holds it
    two.close()
    other.close()
    with pytest.raises(CacheError):
        two.lookup_keys(keys)


def test_a_failed_write_publishes_nothing(request):
    cache = open_keyed_cache(config(request.node.name), LAYOUT)
    request.addfinalizer(cache.close)

    def broken(positions, slots):
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError):
        cache.store_keys([b"k" * 16], broken)
    assert cache.count_cached([b"k" * 16]) == 0
    cache.embedded.check_integrity(quiescent=True)


def test_stored_flags_mark_unplaced_pages():
    res = KeyedReservation(1, tuple(bytes([i]) * 16 for i in range(5)), (1, 2), (7, 8), 2)
    assert res.stored_flags() == [True, True, True, False, False]


def test_bad_url_is_named():
    with pytest.raises(ConfigError, match="kvstore_url"):
        AdapterConfig.from_extra({"kvstore_url": "http://x"})
