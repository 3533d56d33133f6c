"""One contract, two modes: every test here runs against the embedded controller and
against a DaemonClient of a live ``kvstore serve`` (one daemon for the module; each
test uses its own token seeds, so tests do not see each other's pages)."""

import random

import numpy as np
import pytest
import torch

from controller.api import CacheClient, CacheError, CacheStats, LookupResult
from controller.config import ControllerConfig
from controller.embedded import EmbeddedController

from daemon_proc import LAYOUT, NAMESPACE, running_daemon

P = LAYOUT.page_size
NUM_DEVICE_PAGES = 32


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("contract"), host_pages=64) as d:
        yield d


@pytest.fixture(params=["embedded", "daemon"])
def make_cache(request):
    """make_cache(seed) -> (cache, device_pool); every cache made is closed after the test."""
    made: list[CacheClient] = []

    def make(seed: int = 0):
        pool = torch.randn(LAYOUT.pool_shape(NUM_DEVICE_PAGES), generator=torch.Generator().manual_seed(seed))
        if request.param == "embedded":
            cache = EmbeddedController(ControllerConfig(host_pool_pages=64), NAMESPACE, pool)
        else:
            cache = request.getfixturevalue("daemon").client(pool)
        made.append(cache)
        return cache, pool

    yield make
    for cache in made:
        cache.close()


def tokens(seed: int, num_pages: int, extra: int = 0) -> list[int]:
    return random.Random(seed).choices(range(5000), k=num_pages * P + extra)


def test_store_then_lookup_load_release_round_trip(make_cache):
    cache, pool = make_cache(1)
    prompt = tokens(1001, 4, extra=2)  # four full pages and a partial one
    stored = cache.store(prompt, [0, 1, 2, 3, 4])
    assert (stored.num_pages, stored.num_new_pages, stored.num_skipped_pages) == (4, 4, 0)
    assert cache.store(prompt, [0, 1, 2, 3, 4]).num_new_pages == 0

    result = cache.lookup(prompt + [7, 7])
    assert isinstance(result, LookupResult)
    assert (result.num_l2_pages, result.num_l3_pages, result.num_hit_tokens) == (4, 0, 4 * P)
    handle = cache.load(result, [10, 11, 12, 13])
    for layer in range(LAYOUT.num_layers):
        handle.wait_layer(layer)
    assert torch.equal(pool[:, :, 10:14], pool[:, :, 0:4])
    cache.release(result)
    cache.release(result)  # idempotent


def test_a_different_prefix_misses_and_loads_nothing(make_cache):
    cache, _ = make_cache()
    prompt = tokens(1002, 2)
    cache.store(prompt, [0, 1])
    result = cache.lookup([prompt[0] + 1] + prompt[1:])
    assert result.num_hit_pages == 0
    cache.load(result, []).wait_all()
    cache.release(result)


def test_a_shorter_prompt_hits_its_full_pages_only(make_cache):
    cache, _ = make_cache()
    prompt = tokens(1003, 3)
    cache.store(prompt, [0, 1, 2])
    result = cache.lookup(prompt[: 2 * P + 1])
    assert result.num_hit_pages == 2
    cache.release(result)
    assert cache.lookup(prompt[: P - 1]).num_hit_pages == 0


def test_load_after_release_raises(make_cache):
    cache, _ = make_cache()
    prompt = tokens(1004, 2)
    cache.store(prompt, [0, 1])
    result = cache.lookup(prompt)
    handle = cache.load(result, [5, 6])
    cache.release(result)
    with pytest.raises(CacheError):
        cache.load(result, [5, 6])
    with pytest.raises(CacheError):
        handle.wait_layer(0)


@pytest.mark.parametrize("pages", [[5], [5, 6, 7], [5, NUM_DEVICE_PAGES], [5, -1], [5, 5]])
def test_load_refuses_bad_device_pages(make_cache, pages):
    cache, _ = make_cache()
    prompt = tokens(1005, 2)
    cache.store(prompt, [0, 1])
    result = cache.lookup(prompt)
    with pytest.raises(CacheError):
        cache.load(result, pages)
    cache.release(result)


def test_store_refuses_too_few_or_bad_device_pages(make_cache):
    cache, _ = make_cache()
    with pytest.raises(CacheError):
        cache.store(tokens(1006, 3), [0, 1])
    with pytest.raises(CacheError):
        cache.store(tokens(1006, 2), [0, NUM_DEVICE_PAGES])


def test_numpy_tokens_and_page_ids_work(make_cache):
    cache, pool = make_cache(2)
    prompt = np.asarray(tokens(1007, 2), dtype=np.int64)
    assert cache.store(prompt, np.arange(2)).num_new_pages == 2
    result = cache.lookup(prompt)
    cache.load(result, np.array([20, 21])).wait_all()
    assert torch.equal(pool[:, :, 20:22], pool[:, :, 0:2])
    cache.release(result)


def test_stats_count_lookups_and_hits(make_cache):
    cache, _ = make_cache()
    before = cache.stats()
    assert isinstance(before, CacheStats)
    prompt = tokens(1008, 3)
    cache.store(prompt, [0, 1, 2])
    cache.release(cache.lookup(prompt + tokens(1009, 1)))
    after = cache.stats()
    assert after.num_lookups - before.num_lookups == 1
    assert after.num_l2_hit_pages - before.num_l2_hit_pages == 3
    assert after.num_lookup_pages - before.num_lookup_pages == 4
    assert after.num_stored_pages - before.num_stored_pages == 3


def test_a_closed_cache_refuses_every_call(make_cache):
    cache, _ = make_cache()
    prompt = tokens(1010, 1)
    cache.store(prompt, [0])
    result = cache.lookup(prompt)
    cache.close()
    cache.close()  # idempotent
    for call in (lambda: cache.lookup(prompt), lambda: cache.store(prompt, [0]),
                 lambda: cache.load(result, [1]), lambda: cache.release(result), cache.stats):
        with pytest.raises(CacheError):
            call()


def test_layout_is_the_engines(make_cache):
    cache, _ = make_cache()
    assert cache.layout == LAYOUT


# ---- arguments: one rule for both clients (issue 16, item 4) --------------------------
def test_integer_tensors_work_as_tokens_and_page_ids(make_cache):
    cache, pool = make_cache(3)
    prompt = torch.tensor(tokens(1108, 2), dtype=torch.int32)
    assert cache.store(prompt, torch.arange(2)).num_new_pages == 2
    result = cache.lookup(prompt.long())
    assert result.num_hit_pages == 2
    cache.load(result, torch.tensor([22, 23])).wait_all()
    assert torch.equal(pool[:, :, 22:24], pool[:, :, 0:2])
    cache.release(result)
    assert cache.prefetch(prompt.numpy().astype(np.uint16)).wait(5.0)


BAD_TOKENS = [None, [1.0, 2.0] * (2 * P), [-1] * (2 * P), [[1] * P] * 2, "abcd" * P,
              ["a"] * (2 * P), [None] * (2 * P), [True] * (2 * P), [2**31] * (2 * P),
              torch.zeros(2 * P), np.zeros(2 * P), 7]


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=lambda b: type(b).__name__)
def test_bad_tokens_are_cache_errors(make_cache, bad):
    cache, _ = make_cache()
    for call in (lambda: cache.lookup(bad), lambda: cache.prefetch(bad),
                 lambda: cache.store(bad, [0, 1])):
        with pytest.raises(CacheError, match="tokens"):
            call()


@pytest.mark.parametrize("pages", [None, 3, [0.0, 1.0], [True, False], torch.zeros(2),
                                   np.array([[0, 1]]), ["0", "1"]], ids=repr)
def test_bad_page_ids_are_cache_errors(make_cache, pages):
    cache, _ = make_cache()
    prompt = tokens(1109, 2)
    with pytest.raises(CacheError, match="device_pages"):
        cache.store(prompt, pages)
    cache.store(prompt, [0, 1])
    result = cache.lookup(prompt)
    with pytest.raises(CacheError, match="device_pages"):
        cache.load(result, pages)
    cache.release(result)


@pytest.mark.parametrize("layer", [1.0, True, -1, LAYOUT.num_layers, "0", None], ids=repr)
def test_bad_layers_are_cache_errors(make_cache, layer):
    cache, _ = make_cache()
    prompt = tokens(1110, 2)
    cache.store(prompt, [0, 1])
    result = cache.lookup(prompt)
    handle = cache.load(result, [8, 9])
    empty = cache.load(cache.lookup(tokens(1111, 1)), [])
    for h in (handle, empty):
        with pytest.raises(CacheError, match="layer"):
            h.wait_layer(layer)
    handle.wait_layer(np.int64(1))   # numpy ints are ints
    cache.release(result)
