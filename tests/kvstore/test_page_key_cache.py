"""PageKeyCache and the C key chain: the same keys as the plain function, less hashing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.key_chain import load_key_chain
from kvstore.page_keys import PageKeyCache, hash_chain_reference, page_keys

P = 4
NS_A, NS_B = b"a" * 16, b"b" * 16


def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 50, n)  # a small vocabulary: branches share many pages


@pytest.mark.parametrize("page_bytes", [4, 64, 128, 132, 300])
def test_c_chain_equals_hashlib(page_bytes):
    native = load_key_chain()
    if native is None:
        pytest.skip("no C compiler here: page_keys runs the hashlib loop")
    data, seed = os.urandom(page_bytes * 20), os.urandom(16)
    raw = native(seed, data, page_bytes, 20)
    assert [raw[i : i + 16] for i in range(0, len(raw), 16)] == hash_chain_reference(seed, data, page_bytes)


def test_a_next_turn_hashes_only_its_new_pages():
    rng = np.random.default_rng(1)
    cache = PageKeyCache(P)
    turn = _tokens(rng, 10 * P + 3)  # 10 full pages and a partial one
    assert cache.keys(NS_A, turn) == page_keys(NS_A, turn, P)
    assert (cache.num_hashed_pages, cache.num_reused_pages) == (10, 0)
    turn = np.concatenate([turn, _tokens(rng, 5 * P)])  # the partial page completes, 4 more
    assert cache.keys(NS_A, turn) == page_keys(NS_A, turn, P)
    assert (cache.num_hashed_pages, cache.num_reused_pages) == (10 + 5, 10)
    assert cache.keys(NS_A, turn) == page_keys(NS_A, turn, P)  # the same prompt: nothing new
    assert (cache.num_hashed_pages, cache.num_reused_pages) == (15, 25)


def test_a_branch_reuses_the_common_prefix_only():
    rng = np.random.default_rng(2)
    cache = PageKeyCache(P)
    base = _tokens(rng, 12 * P)
    cache.keys(NS_A, base)
    branch = base.copy()
    branch[5 * P + 2] += 1  # differs inside page 5: pages 0-4 reused
    assert cache.keys(NS_A, branch) == page_keys(NS_A, branch, P)
    assert cache.num_hashed_pages == 12 + 7
    # Both are kept: the original again hashes nothing.
    assert cache.keys(NS_A, base) == page_keys(NS_A, base, P)
    assert cache.num_hashed_pages == 19


def test_namespaces_never_share_keys():
    rng = np.random.default_rng(3)
    cache = PageKeyCache(P)
    tokens = _tokens(rng, 8 * P)
    assert cache.keys(NS_A, tokens) == page_keys(NS_A, tokens, P)
    assert cache.keys(NS_B, tokens) == page_keys(NS_B, tokens, P)
    assert cache.num_hashed_pages == 16
    assert cache.keys(NS_A, tokens) != cache.keys(NS_B, tokens)


def test_eviction_bounds_memory_and_keeps_keys_right():
    rng = np.random.default_rng(4)
    cache = PageKeyCache(P, max_prompts=2, max_pages=20)
    first, second, third = (_tokens(rng, 8 * P) for _ in range(3))
    for tokens in (first, second, third):
        cache.keys(NS_A, tokens)
    assert len(cache._prompts) == 2  # the first was evicted
    assert cache.keys(NS_A, first) == page_keys(NS_A, first, P)
    assert cache.num_hashed_pages == 32  # hashed again
    long = _tokens(rng, 30 * P)  # longer than max_pages alone: computed, not kept
    assert cache.keys(NS_A, long) == page_keys(NS_A, long, P)
    assert sum(len(p.keys) for p in cache._prompts) <= 20


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 3)), min_size=1,
                max_size=12), st.integers(1, 4))
def test_random_prompt_sequences_give_the_plain_keys(steps, max_prompts):
    """Each step branches off an earlier prompt (or starts afresh) at a random point,
    in one of two namespaces; keys always equal the plain function's."""
    rng = np.random.default_rng(len(steps))
    cache = PageKeyCache(P, max_prompts=max_prompts, max_pages=60)
    seen: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for parent, cut, extra in steps:
        base = seen[parent % len(seen)]
        tokens = np.concatenate([base[: min(cut, len(base))], _tokens(rng, extra * 3 + cut % 5)])
        ns = NS_A if cut % 7 else NS_B
        assert cache.keys(ns, tokens) == page_keys(ns, tokens, P)
        seen.append(tokens)
    assert cache.num_hashed_pages + cache.num_reused_pages == sum(len(t) // P for t in seen)


def test_list_tokens_and_empty_prompts():
    cache = PageKeyCache(P)
    assert cache.keys(NS_A, []) == []
    assert cache.keys(NS_A, [1, 2, 3]) == []
    assert cache.keys(NS_A, list(range(9))) == page_keys(NS_A, list(range(9)), P)
    with pytest.raises(ValueError):
        cache.keys(NS_A, [-1] * 8)


def test_a_caller_changing_its_keys_does_not_change_the_cache():
    rng = np.random.default_rng(6)
    cache = PageKeyCache(P)
    tokens = _tokens(rng, 6 * P)
    for _ in range(3):  # first sight, then repeats
        keys = cache.keys(NS_A, tokens)
        assert keys == page_keys(NS_A, tokens, P)
        keys.pop()
        keys[0] = b"x" * 16
    longer = np.concatenate([tokens, _tokens(rng, 2 * P)])
    assert cache.keys(NS_A, longer) == page_keys(NS_A, longer, P)
