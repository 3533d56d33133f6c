"""Regression tests for the defects a new user found (issue 8): data lost at close,
misuse that was not refused at the call, and failures that were not visible."""

import os
import socket

import pytest
import torch

from connectors import ConnectorError
from controller.api import CacheError
from controller.config import ControllerConfig, L3Config
from controller.embedded import EmbeddedController
from kvstore.layout import KVLayout, LayoutError
from kvstore.page_keys import KeyNamespace

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
NAMESPACE = KeyNamespace("hardening-model", LAYOUT)
NUM_DEVICE_PAGES = 32


def _controller(l3_path=None, host_pages=8, **l3_fields):
    l3 = L3Config("disk", {"path": str(l3_path), "capacity_bytes": 64 << 20}, **l3_fields) \
        if l3_path is not None else L3Config()
    pool = torch.randn(LAYOUT.pool_shape(NUM_DEVICE_PAGES), generator=torch.Generator().manual_seed(0))
    return EmbeddedController(ControllerConfig(host_pool_pages=host_pages, l3=l3), NAMESPACE, pool), pool


def test_write_back_close_writes_l2_pages_to_disk_for_the_next_engine(tmp_path):
    tokens = list(range(6 * 4))
    ctl, pool = _controller(tmp_path / "l3")
    assert ctl.store(tokens, list(range(6))).num_new_pages == 6
    assert ctl.stats().num_due_pages == 6          # all still in L2 only
    report = ctl.close()
    assert (report.num_written, report.num_failed) == (6, 0)

    again, pool2 = _controller(tmp_path / "l3")
    result = again.lookup(tokens)
    assert (result.num_l2_pages, result.num_l3_pages) == (0, 6)   # was 0 hits before the fix
    handle = again.load(result, list(range(10, 16)))
    handle.wait_all()
    assert torch.equal(pool2[:, :, 10:16], pool[:, :, 0:6])
    again.release(result)
    assert again.close().num_written == 0          # pages read from L3 are not due again


def test_close_reports_pages_it_could_not_write(tmp_path):
    ctl, _ = _controller(tmp_path / "l3", close_flush_s=0)
    ctl.store(list(range(12)), [0, 1, 2])
    report = ctl.close()
    assert (report.num_written, report.num_failed) == (0, 3)


def test_every_call_on_a_closed_client_raises_cache_error(tmp_path):
    ctl, _ = _controller(tmp_path / "l3")
    ctl.store(list(range(8)), [0, 1])
    result = ctl.lookup(list(range(8)))
    ctl.close()
    calls = {
        "lookup": lambda: ctl.lookup(list(range(8))),
        "load": lambda: ctl.load(result, [3, 4]),
        "store": lambda: ctl.store(list(range(8)), [0, 1]),
        "release": lambda: ctl.release(result),
        "stats": lambda: ctl.stats(),
    }
    for name, call in calls.items():
        with pytest.raises(CacheError, match="closed"):
            call()
    ctl.close()   # idempotent


@pytest.mark.parametrize("bad, message", [
    ([4.7, 1], "4.7 .float.; device page ids must be ints"),
    ([0, -1], "-1 is outside the engine pool"),
    ([0, NUM_DEVICE_PAGES], f"{NUM_DEVICE_PAGES} is outside the engine pool"),
    ([5, 5], "names device page 5 twice"),
    ([True, 2], "True .bool."),
])
def test_bad_page_ids_are_refused_at_the_call(tmp_path, bad, message):
    ctl, _ = _controller()
    with pytest.raises(CacheError, match=message):
        ctl.store(list(range(8)), bad)
    ctl.store(list(range(8)), [0, 1])
    result = ctl.lookup(list(range(8)))
    with pytest.raises(CacheError, match=message):
        ctl.load(result, bad)            # refused here, not later at wait_all()
    ctl.release(result)
    ctl.check_integrity(quiescent=True)
    ctl.close()


def test_numpy_page_ids_are_accepted():
    import numpy as np

    ctl, _ = _controller()
    assert ctl.store(list(range(8)), np.array([3, 4])).num_new_pages == 2
    ctl.close()


def test_pool_of_the_other_arrangement_is_named_as_such():
    page_first = torch.zeros(LAYOUT.with_arrangement("page_first").pool_shape(16))
    with pytest.raises(LayoutError, match=r"a page_first pool of 16 pages, but the layout says "
                                          r"layer_first, whose pool of 16 pages has shape \(2, 2, 16"):
        EmbeddedController(ControllerConfig(), NAMESPACE, page_first)


def test_stats_show_hits_per_tier_and_l3_failures(tmp_path):
    with socket.socket() as s:  # a loopback port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ControllerConfig(host_pool_pages=2, l3=L3Config(
        "redis", {"host": "127.0.0.1", "port": port, "timeout_s": 0.5, "error_backoff_s": 0},
        write_policy="write_through", close_flush_s=1))
    ctl = EmbeddedController(config, NAMESPACE, torch.zeros(LAYOUT.pool_shape(NUM_DEVICE_PAGES)))
    ctl.store(list(range(16)), [0, 1, 2, 3])
    result = ctl.lookup(list(range(16)))
    ctl.release(result)
    assert ctl.drain_backups(10)             # L3 writes run in the background
    st = ctl.stats()
    assert (st.num_lookups, st.num_lookup_pages, st.num_l2_hit_pages, st.num_l3_hit_pages) == (1, 4, 2, 0)
    assert st.num_stored_pages == 2 and st.num_l3_written_pages == 0
    assert st.num_l3_errors >= 2 and st.num_due_pages == 2      # the failed puts left them due
    report = ctl.close()
    assert report.num_failed == 2


def test_an_l3_directory_that_cannot_be_written_fails_at_connect():
    with pytest.raises(ConnectorError, match="choose"):
        _controller("/proc/self/kvstore-l3")
    with pytest.raises(ConnectorError, match="new or empty directory"):
        _controller("/sys/kernel")
