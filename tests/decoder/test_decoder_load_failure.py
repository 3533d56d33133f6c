"""A load that fails (LoadError) is recomputed from its first bad page, and the output
is bit-exact with a cache-off run split at that page.

The fault is real slot reuse as the fence sees it: the generation of the host slot
of one hit page changes after the load was made (as when another writer is handed
that slot), so the load's own check reports it; nothing in the engine is stubbed.
"""

import pytest
import torch
from decoder_fakes import make_engine, random_tokens

from controller import ControllerConfig, connect
from kvstore.page_keys import KeyNamespace

P = 8


def cached_engine():
    engine = make_engine(P)
    cache = connect(ControllerConfig(host_pool_pages=64),
                    KeyNamespace(engine.model.config.model_id, engine.layout), engine.kv_pool)
    engine.attach_cache(cache)
    return engine, cache


@pytest.mark.parametrize("bad_page", [0, 2, 4])
def test_failed_load_recomputes_from_the_first_bad_page_bit_exact(bad_page):
    engine, cache = cached_engine()
    try:
        prompt = random_tokens(6 * P + 3, 21)
        engine.generate(prompt, 2)                       # stores the prompt's 6 full pages
        request = engine.start(prompt, 5)
        assert request.prefix.num_pages == 6
        slot = cache._core.slots_of([request.lookup.keys[bad_page]])[0]
        cache._core.pool.generations[slot] += 1          # that slot changed owner mid-load
        while not engine.prefill_step(request):
            pass
        while not request.is_finished:
            engine.decode_step(request)
        got = engine.finish(request)
        assert (got.num_cached_tokens, got.num_load_failed_tokens) == (bad_page * P, (6 - bad_page) * P)
        expected = make_engine(P).generate(prompt, 5, split_at=bad_page * P)
        assert got.tokens == expected.tokens
        assert torch.equal(got.logits, expected.logits)
        cache.check_integrity(quiescent=True)
    finally:
        cache.close()
