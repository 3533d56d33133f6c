"""ReferenceEngine: prefill + greedy decode, page allocation, and the cache protocol.

The central property: with a cache, every token and logit equals the run
without one, bit for bit (float32, CPU), over multi-turn conversations.
"""

import pytest
import torch
from decoder_fakes import FakeCache, engine_with_cache, make_engine, random_tokens, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder import EngineError, PageAllocator, ReferenceEngine

P = 8


def assert_same_output(a, b):
    assert a.tokens == b.tokens
    assert torch.equal(a.logits, b.logits)


def manual_generate(model, layout, prompt, max_new_tokens):
    """The engine's computation spelled out: page-sized prefill chunks, last row projected,
    then one token per step."""
    pool = torch.zeros(layout.pool_shape(16))
    table = torch.arange(15, -1, -1)
    tokens = torch.tensor(prompt)
    for s in range(0, len(prompt), P):
        hidden = model.forward_hidden(tokens[s : s + P], s, pool, layout, table)
    logits = [model.compute_logits(hidden[-1:])[0]]
    out = [int(logits[0].argmax())]
    for step in range(1, max_new_tokens):
        row = model.forward_chunk(torch.tensor(out[-1:]), len(prompt) + step - 1, pool, layout, table)
        logits.append(row[0])
        out.append(int(row[0].argmax()))
    return out, torch.stack(logits)


# ---- without a cache -------------------------------------------------------------
def test_generate_returns_tokens_logits_and_counts():
    engine = make_engine(P)
    result = engine.generate(random_tokens(19, 0), 6)
    assert result.prompt_len == 19 and len(result.tokens) == 6
    assert result.output_tokens is result.tokens
    assert result.logits.shape == (6, 512) and result.logits.dtype == torch.float32
    assert result.logits.device.type == "cpu"
    assert result.tokens == result.logits.argmax(dim=-1).tolist()
    assert (result.num_cached_tokens, result.num_l2_tokens, result.num_l3_tokens) == (0, 0, 0)
    assert result.num_computed_tokens == 19
    assert 0 < result.ttft_s <= result.total_s


def test_generate_equals_the_chunk_calls_spelled_out():
    engine = make_engine(P)
    prompt = random_tokens(27, 1)
    tokens, logits = manual_generate(engine.model, engine.layout, prompt, 7)
    result = engine.generate(prompt, 7)
    assert result.tokens == tokens
    assert torch.equal(result.logits, logits)


def test_greedy_decode_continues_the_prompt_consistently():
    """Feeding prompt + first k outputs back as a prompt yields the same later tokens
    (up to rounding: decode KV is computed one token at a time, prefill one page at a time)."""
    engine = make_engine(P)
    prompt = random_tokens(21, 2)
    full = engine.generate(prompt, 8)
    resumed = engine.generate(prompt + full.tokens[:3], 5)
    torch.testing.assert_close(resumed.logits, full.logits[3:], rtol=1e-4, atol=1e-4)
    assert resumed.tokens == full.tokens[3:]


def test_pages_are_freed_after_each_request_and_after_errors():
    engine = make_engine(P, num_pages=8)
    engine.generate(random_tokens(40, 3), 10)  # needs 7 of 8 pages
    assert engine.allocator.num_free == 8
    engine.allocator.check_integrity()
    with pytest.raises(EngineError, match="need 9 device pages, 8 of 8 are free"):
        engine.generate(random_tokens(60, 3), 10)
    assert engine.allocator.num_free == 8


def test_repeated_requests_reuse_pages_without_leaking_state():
    engine = make_engine(P, num_pages=8)
    first = engine.generate(random_tokens(30, 4), 5)
    engine.generate(random_tokens(50, 5), 5)  # dirties every page
    assert_same_output(first, engine.generate(random_tokens(30, 4), 5))


def test_arrangement_does_not_change_output():
    prompt = random_tokens(26, 6)
    a = make_engine(P, arrangement="layer_first").generate(prompt, 5)
    b = make_engine(P, arrangement="page_first").generate(prompt, 5)
    assert_same_output(a, b)


@pytest.mark.parametrize(
    "prompt, max_new_tokens, message",
    [
        ([], 3, "at least one token"),
        ([1, 2], 0, "max_new_tokens must be an int >= 1"),
        ([1, 512], 3, r"token ids must be in \[0, 512\)"),
        ([-1], 3, "token ids must be in"),
        ([1] * 1000, 30, "exceeds max_positions"),
    ],
)
def test_bad_requests_are_rejected(prompt, max_new_tokens, message):
    engine = make_engine(P, num_pages=200)
    with pytest.raises(EngineError, match=message):
        engine.generate(prompt, max_new_tokens)
    assert engine.allocator.num_free == 200


def test_engine_rejects_a_layout_of_another_model_and_bad_sizes():
    model = tiny_model()
    with pytest.raises(ValueError, match="does not fit"):
        ReferenceEngine(model, model.config.kv_layout(P).__class__(3, 2, 16, P, "float32"), 4)
    with pytest.raises(EngineError, match="num_device_pages"):
        ReferenceEngine(model, model.config.kv_layout(P), 0)


# ---- page allocator -----------------------------------------------------------------
def test_allocator_hands_out_distinct_pages_and_checks_frees():
    alloc = PageAllocator(4)
    pages = alloc.allocate(3)
    assert sorted(pages) == [0, 1, 2] and alloc.num_free == 1
    with pytest.raises(EngineError, match="need 2 device pages, 1 of 4"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a refused allocation takes nothing
    alloc.free(pages[:1])
    with pytest.raises(EngineError, match="not allocated"):
        alloc.free(pages[:1])
    alloc.check_integrity()
    assert sorted(alloc.allocate(2)) == sorted([pages[0], 3])


# ---- with a cache ---------------------------------------------------------------------
def test_cache_protocol_order_on_a_hit():
    engine, cache = engine_with_cache(P)
    prompt = random_tokens(30, 7)  # 3 full pages + 6 tokens
    engine.generate(prompt, 4)
    assert cache.call_names() == ["lookup", "store", "release"]
    assert cache.calls[1] == ("store", 24, (0, 1, 2))  # full prompt pages only

    cache.calls.clear()
    result = engine.generate(prompt + random_tokens(10, 8), 4)
    layers = engine.layout.num_layers
    assert cache.call_names() == ["lookup", "load"] + ["wait_layer"] * layers + [
        "wait_all", "store", "release"]
    assert cache.calls[0] == ("lookup", 40, 3)
    assert [c[1] for c in cache.calls[2 : 2 + layers]] == list(range(layers))
    assert len(cache.calls[1][1]) == 3  # device pages for the 3 hit pages
    assert cache.calls[-1][1] not in cache.leases  # the lease ended
    assert (result.num_cached_tokens, result.num_computed_tokens) == (24, 16)
    assert engine.allocator.num_free == 64


def test_cache_off_and_on_agree_bit_for_bit_over_a_conversation():
    plain = make_engine(P)
    engine, cache = engine_with_cache(P)
    history, prev_len = random_tokens(13, 9), 0
    for turn in range(4):
        expected = plain.generate(history, 6)
        got = engine.generate(history, 6)
        assert_same_output(expected, got)
        # the previous turn stored its prompt's full pages; its outputs were decoded, not stored
        assert got.num_cached_tokens == prev_len // P * P
        assert got.num_cached_tokens + got.num_computed_tokens == len(history)
        prev_len = len(history)
        history = history + got.tokens + random_tokens(7, 10 + turn)


def test_l2_and_l3_hits_are_counted_and_exact():
    plain = make_engine(P)
    engine, cache = engine_with_cache(P)
    prompt = random_tokens(35, 11)
    engine.generate(prompt, 3)
    cache.l3_keys.update(cache.keys(prompt)[2:])  # pages 2, 3 now "on disk"
    follow_up = prompt + random_tokens(9, 12)
    got = engine.generate(follow_up, 5)
    assert (got.num_l2_tokens, got.num_l3_tokens, got.num_cached_tokens) == (16, 16, 32)
    assert_same_output(plain.generate(follow_up, 5), got)


def test_whole_prompt_cached_recomputes_its_last_page():
    plain = make_engine(P)
    engine, cache = engine_with_cache(P)
    prompt = random_tokens(4 * P, 13)
    first = engine.generate(prompt, 5)
    cache.l3_keys.add(cache.keys(prompt)[-1])
    again = engine.generate(prompt, 5)
    assert cache.calls[-7][0] == "lookup" and cache.calls[-7][2] == 4
    assert len(cache.calls[-6][1]) == 4  # load gets every leased page
    assert (again.num_cached_tokens, again.num_computed_tokens) == (3 * P, P)
    assert (again.num_l2_tokens, again.num_l3_tokens) == (3 * P, 0)  # the dropped page was L3
    assert_same_output(first, again)
    assert_same_output(plain.generate(prompt, 5), again)


def test_decode_kv_is_never_stored():
    engine, cache = engine_with_cache(P)
    prompt = random_tokens(10, 14)
    engine.generate(prompt, 20)  # decode fills pages 1..3
    assert len(cache.pages) == 1
    stores = [c for c in cache.calls if c[0] == "store"]
    assert stores == [("store", 8, (0,))]


def test_short_prompt_stores_nothing_and_still_releases():
    engine, cache = engine_with_cache(P)
    engine.generate(random_tokens(5, 15), 3)
    assert cache.call_names() == ["lookup", "release"]


def test_lease_is_released_when_prefill_fails():
    engine, cache = engine_with_cache(P)
    prompt = random_tokens(20, 16)
    engine.generate(prompt, 2)

    def broken_wait(layer):
        raise RuntimeError("transfer failed")

    original_load = cache.load

    def load(result, pages):
        handle = original_load(result, pages)
        handle.wait_layer = broken_wait
        return handle

    cache.load = load
    with pytest.raises(RuntimeError, match="transfer failed"):
        engine.generate(prompt + [1, 2, 3], 2)
    assert cache.calls[-1][0] == "release" and not cache.leases
    assert engine.allocator.num_free == 64


def test_attach_cache_checks_the_layout():
    engine = make_engine(P)
    other = make_engine(4)
    with pytest.raises(EngineError, match="layout"):
        engine.attach_cache(FakeCache(other.layout, other.kv_pool))
    engine.attach_cache(None)
    assert engine.cache is None


def test_page_first_engine_with_cache_is_exact():
    plain = make_engine(P)
    engine, cache = engine_with_cache(P, arrangement="page_first")
    prompt = random_tokens(25, 17)
    engine.generate(prompt, 3)
    follow_up = prompt + random_tokens(12, 18)
    got = engine.generate(follow_up, 4)
    assert got.num_cached_tokens == 24
    assert_same_output(plain.generate(follow_up, 4), got)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.sampled_from([1, 3, 8, 16]),
    first_len=st.integers(1, 40),
    turns=st.lists(st.integers(0, 20), min_size=1, max_size=3),
    max_new_tokens=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_property_cache_never_changes_output(page_size, first_len, turns, max_new_tokens, seed):
    plain = make_engine(page_size, num_pages=200)
    engine, cache = engine_with_cache(page_size, num_pages=200)
    history = random_tokens(first_len, seed)
    for i, extra in enumerate(turns):
        expected, got = plain.generate(history, max_new_tokens), engine.generate(history, max_new_tokens)
        assert_same_output(expected, got)
        assert got.num_cached_tokens % page_size == 0 and got.num_computed_tokens >= 1
        history = history + got.tokens + random_tokens(extra, seed + i + 1)
    assert not cache.leases and engine.allocator.num_free == 200
