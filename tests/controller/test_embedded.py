"""The embedded controller with a CPU 'device' pool: store, lookup, load, spill to L3 and back."""

import os

import pytest
import torch

from controller.api import CacheError
from controller.config import ConfigError, ControllerConfig, L3Config
from controller.embedded import EmbeddedController
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
NAMESPACE = KeyNamespace("unit-test-model", LAYOUT)
NUM_DEVICE_PAGES = 32


def make_controller(tmp_path, host_pages=8, l3="disk", write_policy="write_back"):
    device_pool = torch.zeros(LAYOUT.pool_shape(NUM_DEVICE_PAGES))
    options = {"path": str(tmp_path / "l3"), "capacity_bytes": 64 << 20} if l3 == "disk" else {}
    config = ControllerConfig(
        host_pool_pages=host_pages,
        l3=L3Config(connector=l3, options=options, write_policy=write_policy),
    )
    return EmbeddedController(config, NAMESPACE, device_pool), device_pool


def fill_pages(pool, pages, seed):
    gen = torch.Generator().manual_seed(seed)
    for page in pages:
        pool[:, :, page] = torch.randn(pool[:, :, page].shape, generator=gen)


def pages_equal(pool, a, b):
    return all(torch.equal(pool[:, :, x], pool[:, :, y]) for x, y in zip(a, b))


def test_store_then_lookup_and_load_round_trip(tmp_path):
    ctl, pool = make_controller(tmp_path)
    tokens = list(range(18))  # four full pages and a partial one
    fill_pages(pool, range(4), seed=1)
    stored = ctl.store(tokens, [0, 1, 2, 3, 4])
    assert (stored.num_pages, stored.num_new_pages) == (4, 4)
    assert ctl.store(tokens, [0, 1, 2, 3, 4]).num_new_pages == 0

    result = ctl.lookup(tokens + [99, 98])
    assert (result.num_l2_pages, result.num_l3_pages, result.num_hit_tokens) == (4, 0, 16)
    handle = ctl.load(result, [10, 11, 12, 13])
    for layer in range(LAYOUT.num_layers):
        handle.wait_layer(layer)
    ctl.release(result)
    assert pages_equal(pool, [0, 1, 2, 3], [10, 11, 12, 13])
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_a_different_prefix_misses(tmp_path):
    ctl, pool = make_controller(tmp_path)
    ctl.store(list(range(8)), [0, 1])
    result = ctl.lookup([5] + list(range(1, 8)))
    assert result.num_hit_pages == 0
    ctl.load(result, []).wait_all()
    ctl.release(result)
    ctl.close()


def test_evicted_pages_spill_to_disk_and_come_back(tmp_path):
    ctl, pool = make_controller(tmp_path, host_pages=4)
    first, second = list(range(16)), list(range(100, 116))
    fill_pages(pool, range(8), seed=2)
    ctl.store(first, [0, 1, 2, 3])
    ctl.store(second, [4, 5, 6, 7])  # evicts all of `first` to L3
    assert ctl.drain_backups()
    assert ctl.stats().num_evicted_pages == 4
    assert ctl.stats().num_l3_written_pages == 4

    result = ctl.lookup(first)
    assert (result.num_l2_pages, result.num_l3_pages) == (0, 4)
    ctl.load(result, [20, 21, 22, 23]).wait_all()
    ctl.release(result)
    assert pages_equal(pool, [0, 1, 2, 3], [20, 21, 22, 23])
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_leased_pages_are_not_evicted_and_full_pools_skip(tmp_path):
    ctl, pool = make_controller(tmp_path, host_pages=4, l3=None)
    ctl.store(list(range(16)), [0, 1, 2, 3])
    held = ctl.lookup(list(range(16)))
    stored = ctl.store(list(range(200, 208)), [4, 5])
    assert (stored.num_new_pages, stored.num_skipped_pages) == (0, 2)
    again = ctl.lookup(list(range(16)))
    assert again.num_l2_pages == 4
    ctl.release(again)
    ctl.release(held)
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_load_after_release_or_with_wrong_pages_is_refused(tmp_path):
    ctl, pool = make_controller(tmp_path, l3=None)
    ctl.store(list(range(8)), [0, 1])
    result = ctl.lookup(list(range(8)))
    with pytest.raises(CacheError, match="one device page per hit page"):
        ctl.load(result, [5])
    ctl.release(result)
    ctl.release(result)  # idempotent
    with pytest.raises(CacheError, match="lookup\\(\\) again"):
        ctl.load(result, [5, 6])
    ctl.close()


def test_write_through_puts_every_new_page(tmp_path):
    ctl, pool = make_controller(tmp_path, write_policy="write_through")
    ctl.store(list(range(12)), [0, 1, 2])
    assert ctl.drain_backups()
    assert ctl.stats().num_l3_written_pages == 3
    ctl.close()
    # A second controller on the same directory (a restart) finds them on disk.
    ctl2, pool2 = make_controller(tmp_path)
    result = ctl2.lookup(list(range(12)))
    assert (result.num_l2_pages, result.num_l3_pages) == (0, 3)
    ctl2.release(result)
    ctl2.close()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="host_pool_pages"):
        ControllerConfig(host_pool_pages=0)
    with pytest.raises(ConfigError, match="eviction_policy"):
        ControllerConfig(eviction_policy="random")
    with pytest.raises(ConfigError, match="host_pool_pages"):
        ControllerConfig(host_pool_pages=True)
    with pytest.raises(ConfigError, match="copy_backend"):
        ControllerConfig(copy_backend="teleport")
    with pytest.raises(ConfigError, match="write_policy"):
        L3Config(connector="disk", write_policy="sometimes")


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"kvstore-{os.getpid()}-")}


def test_unknown_l3_connector_is_refused_with_the_choices(tmp_path):
    from connectors import ConnectorError

    before = shm_segments()
    with pytest.raises(ConnectorError, match="disk"):
        EmbeddedController(ControllerConfig(l3=L3Config("tape")), NAMESPACE,
                           torch.zeros(LAYOUT.pool_shape(4)))
    assert shm_segments() == before  # the host pool made before the failure is gone


def test_an_unreachable_l3_turns_into_misses_not_errors(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ControllerConfig(host_pool_pages=2, l3=L3Config(
        "redis", {"host": "127.0.0.1", "port": port, "timeout_s": 0.5}, write_policy="write_through"))
    pool = torch.zeros(LAYOUT.pool_shape(NUM_DEVICE_PAGES))
    ctl = EmbeddedController(config, NAMESPACE, pool)
    assert ctl.store(list(range(16)), [0, 1, 2, 3]).num_new_pages == 2  # L2 holds 2, puts fail
    assert ctl.stats().num_l3_written_pages == 0
    result = ctl.lookup(list(range(16)))
    assert (result.num_l2_pages, result.num_l3_pages) == (2, 0)  # the rest never reached L3
    ctl.release(result)
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_store_fills_a_gap_in_the_middle_of_a_cached_chain(tmp_path):
    ctl, pool = make_controller(tmp_path, l3=None)
    tokens = list(range(16))
    fill_pages(pool, range(4), seed=3)
    ctl.store(tokens, [0, 1, 2, 3])
    result = ctl.lookup(tokens)
    ctl.release(result)
    ctl.host_store.discard([result.keys[1]])
    result = ctl.lookup(tokens)
    assert result.num_hit_pages == 1  # the chain breaks at the gap
    ctl.release(result)
    stored = ctl.store(tokens, [0, 1, 2, 3])
    assert (stored.num_new_pages, stored.num_skipped_pages) == (1, 0)
    result = ctl.lookup(tokens)
    assert result.num_hit_pages == 4
    ctl.load(result, [8, 9, 10, 11]).wait_all()
    assert pages_equal(pool, [0, 1, 2, 3], [8, 9, 10, 11])
    ctl.release(result)
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_waiting_on_a_load_after_release_is_refused(tmp_path):
    ctl, pool = make_controller(tmp_path, l3=None)
    fill_pages(pool, range(2), seed=4)
    ctl.store(list(range(8)), [0, 1])
    result = ctl.lookup(list(range(8)))
    handle = ctl.load(result, [5, 6])
    handle.wait_layer(0)
    ctl.release(result)
    for layer in (0, 1):  # copied or not: the docstring promises CacheError after release
        with pytest.raises(CacheError, match="released"):
            handle.wait_layer(layer)
    with pytest.raises(CacheError, match="released"):
        handle.wait_all()
    empty = ctl.lookup([999] * 3)          # no full page: a load with nothing to move
    nothing = ctl.load(empty, [])
    ctl.release(empty)
    with pytest.raises(CacheError, match="released"):
        nothing.wait_layer(0)
    ctl.close()


def test_a_store_with_bad_device_pages_changes_nothing(tmp_path):
    ctl, pool = make_controller(tmp_path, host_pages=2, l3=None)
    for _ in range(3):
        with pytest.raises(CacheError, match="outside the engine pool"):
            ctl.store(list(range(100, 108)), [0, NUM_DEVICE_PAGES + 5])
    ctl.check_integrity(quiescent=True)
    assert ctl.store(list(range(8)), [0, 1]).num_new_pages == 2
    ctl.close()


def test_release_of_a_result_from_another_cache_is_refused(tmp_path):
    a, _ = make_controller(tmp_path, l3=None)
    b, _ = make_controller(tmp_path, l3=None)
    a.store(list(range(8)), [0, 1])
    b.store(list(range(100, 108)), [0, 1])
    ra, rb = a.lookup(list(range(8))), b.lookup(list(range(100, 108)))
    assert ra.lease_id == rb.lease_id
    with pytest.raises(CacheError, match="not lease"):
        a.release(rb)
    a.release(ra)
    b.release(rb)
    a.check_integrity(quiescent=True)
    a.close()
    b.close()
