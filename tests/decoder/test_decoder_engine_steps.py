"""ReferenceEngine in steps (start / prefill_step / decode_step / finish / abort), as the
scheduler drives it: the same bits as generate(), and nothing held after an abort."""

import pytest
import torch
from decoder_fakes import engine_with_cache, make_engine, random_tokens

from decoder import EngineError

P = 8


def test_steps_equal_generate_with_and_without_cache():
    plain = make_engine(P)
    cached, cache = engine_with_cache(P)
    prompt = random_tokens(29, 4)
    cached.generate(prompt[:20], 1)  # 2 pages cached
    request = cached.start(prompt, 5)
    assert request.prefix.num_pages == 2 and request.chunks == [(16, 24), (24, 29)]
    assert cache.call_names()[-2:] == ["lookup", "load"] and request.lookup is not None
    assert not cached.prefill_step(request) and not request.is_prefilled
    assert cached.prefill_step(request) and request.tokens and request.lookup is None
    assert cache.call_names()[-2:] == ["store", "release"]
    while not request.is_finished:
        cached.decode_step(request)
    got, want = cached.finish(request), plain.generate(prompt, 5)
    assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    assert got.num_cached_tokens == 16 and cached.allocator.num_free == cached.allocator.num_pages


def test_abort_mid_prefill_ends_the_lease_and_frees_the_pages():
    engine, cache = engine_with_cache(P)
    prompt = random_tokens(40, 5)
    engine.generate(prompt[:24], 1)
    request = engine.start(prompt, 3)
    engine.prefill_step(request)
    with pytest.raises(EngineError, match="not prefilled"):
        engine.decode_step(request)
    engine.abort(request)
    engine.abort(request)  # idempotent
    assert cache.calls[-1][0] == "release" and not cache.leases
    assert engine.allocator.num_free == engine.allocator.num_pages
    engine.allocator.check_integrity()
    with pytest.raises(EngineError, match="prefilled or freed"):
        engine.prefill_step(request)


def test_finish_before_the_last_token_is_refused():
    engine = make_engine(P)
    request = engine.begin(random_tokens(12, 6), 3)
    with pytest.raises(EngineError, match="finish after 1 of 3"):
        engine.finish(request)
    engine.abort(request)
