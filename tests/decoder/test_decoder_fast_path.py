"""The GPU fast path of the reference decoder, checked on CPU at tiny sizes: the Llama-3-8B
preset's arithmetic (nothing allocated), SDPA attention against the explicit reference,
big prefill chunks, split_at, and weights drawn on the model's device."""

import pytest
import torch
from decoder_fakes import FakeCache, random_tokens

from decoder import DecoderConfig, EngineError, ReferenceDecoder, ReferenceEngine
from decoder.engine import chunk_bounds
from decoder.flops import kv_bytes_per_token, layer_matmul_params, num_parameters, prefill_flops
from decoder.model import attention, sdpa_attention


def test_llama3_8b_preset_has_llama3_8b_shapes_and_size():
    c = DecoderConfig.preset("llama3-8b")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 4096, 32, 8, 128)
    assert (c.intermediate_size, c.vocab_size) == (14336, 128256)
    assert c.max_positions >= 65536 + 1024  # the bench's 64K context plus decode
    assert layer_matmul_params(c) == 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336
    assert num_parameters(c) == 8_030_261_248  # Llama-3-8B's published count
    assert kv_bytes_per_token(c) == 128 * 1024  # bf16: 128 KiB a token, 4 GiB for 32K
    layout = c.kv_layout(64, dtype="bfloat16")
    assert layout.page_bytes == 64 * 128 * 1024


def test_prefill_flops_count_matmuls_and_causal_attention():
    c = DecoderConfig.preset("tiny")
    full = prefill_flops(c, 8)
    assert full["matmul"] == 2 * c.num_layers * layer_matmul_params(c) * 8
    assert full["attention"] == 4 * c.num_layers * c.num_heads * c.head_dim * (8 * 9 / 2)
    suffix = prefill_flops(c, 4, start_pos=4)
    assert suffix["attention"] == 4 * c.num_layers * c.num_heads * c.head_dim * (16 + 10)
    assert full["total"] == full["matmul"] + full["attention"]
    with pytest.raises(ValueError, match="must be >= 0"):
        prefill_flops(c, -1)


@pytest.mark.parametrize("n, end", [(12, 12), (5, 12), (1, 12)])
def test_sdpa_attention_matches_the_explicit_reference(n, end):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, 4, 16, generator=gen)
    k, v = torch.randn(end, 2, 16, generator=gen), torch.randn(end, 2, 16, generator=gen)
    positions = torch.arange(end - n, end)
    allowed = torch.arange(end)[None, :] <= positions[:, None]
    torch.testing.assert_close(sdpa_attention(q, k, v), attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_sdpa_model_is_close_to_the_explicit_one():
    config = DecoderConfig.preset("tiny")
    explicit, fast = ReferenceDecoder(config), ReferenceDecoder(config, attention="sdpa")
    layout = config.kv_layout(8)
    prompt = torch.tensor(random_tokens(40, 3))
    logits = []
    for model in (explicit, fast):
        pool = torch.zeros(layout.pool_shape(8))
        model.forward_hidden(prompt[:24], 0, pool, layout, torch.arange(8))
        logits.append(model.forward_chunk(prompt[24:], 24, pool, layout, torch.arange(8)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_model_options_are_checked():
    config = DecoderConfig.preset("tiny")
    with pytest.raises(ValueError, match="attention must be one of"):
        ReferenceDecoder(config, attention="flash3")
    with pytest.raises(ValueError, match="draw_on must be one of"):
        ReferenceDecoder(config, draw_on="gpu")


def test_weights_drawn_on_a_cpu_device_equal_the_cpu_draw():
    config = DecoderConfig.preset("tiny")
    a, b = ReferenceDecoder(config), ReferenceDecoder(config, draw_on="device")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    half = ReferenceDecoder(config, dtype=torch.bfloat16, draw_on="device")
    assert half.layers[0].wq.dtype == torch.bfloat16
    assert torch.equal(half.layers[0].wq, a.layers[0].wq.to(torch.bfloat16))


def test_chunk_bounds_count_from_the_first_position_and_from_split_at():
    assert chunk_bounds(0, 20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert chunk_bounds(8, 20, 16) == [(8, 20)]
    assert chunk_bounds(0, 20, 8, split_at=12) == [(0, 8), (8, 12), (12, 20)]
    assert chunk_bounds(0, 20, 64, split_at=12) == [(0, 12), (12, 20)]
    assert chunk_bounds(12, 20, 8, split_at=12) == [(12, 20)]  # split at the first position: no-op
    assert chunk_bounds(0, 20, 8, split_at=24) == [(0, 8), (8, 16), (16, 20)]


def test_prefill_chunk_len_must_be_whole_pages():
    config = DecoderConfig.preset("tiny")
    model = ReferenceDecoder(config)
    for bad in (12, 0, True):
        with pytest.raises(EngineError, match="prefill_chunk_len must be a positive multiple"):
            ReferenceEngine(model, config.kv_layout(8), 16, prefill_chunk_len=bad)
    engine = ReferenceEngine(model, config.kv_layout(8), 16, prefill_chunk_len=32)
    with pytest.raises(EngineError, match="split_at must be a multiple"):
        engine.generate(random_tokens(20, 0), 1, split_at=5)


@pytest.mark.parametrize("attention_kind", ["explicit", "sdpa"])
def test_big_chunks_with_cache_equal_a_cache_off_run_split_at_the_hit(attention_kind):
    """The exactness that the GPU bench checks, at tiny size: pages [0, B) stored by a run
    that computed them in big chunks; a cache run computing [B, end) equals a cache-off run
    split at B, bit for bit."""
    config = DecoderConfig.preset("tiny")
    model = ReferenceDecoder(config, attention=attention_kind)
    layout = config.kv_layout(8)
    prompt, boundary = random_tokens(70, 5), 40
    cached = ReferenceEngine(model, layout, 32, prefill_chunk_len=32)
    cached.attach_cache(FakeCache(layout, cached.kv_pool))
    cached.generate(prompt[:boundary], 1)  # stores pages [0, 40) computed as [0, 32) + [32, 40)
    with_cache = cached.generate(prompt, 6)
    assert with_cache.num_cached_tokens == boundary
    plain = ReferenceEngine(model, layout, 32, prefill_chunk_len=32)
    split = plain.generate(prompt, 6, split_at=boundary)
    assert with_cache.tokens == split.tokens
    assert torch.equal(with_cache.logits, split.logits)
