"""decoder/attention.py: the split attention (prefix part + square causal part, merged by
log-sum-exp) against the explicit float32 reference and the one-call lower-right kernel,
and its fall-back when the backend's op gives a wrong or no result."""

import pytest
import torch

from decoder import attention as attn
from decoder.attention import attention, sdpa_attention, split_attention


def qkv(n: int, end: int, heads: int = 4, kv_heads: int = 2, d: int = 16, dtype=torch.float32,
        device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, generator=gen)
    k, v = torch.randn(end, kv_heads, d, generator=gen), torch.randn(end, kv_heads, d, generator=gen)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def reference(q, k, v):
    n, end = q.shape[0], k.shape[0]
    allowed = torch.arange(end, device=q.device)[None, :] <= torch.arange(end - n, end, device=q.device)[:, None]
    return attention(q, k, v, allowed)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(attn, "_split_verdicts", {})
    # The tests' chunks are small: let them take the split path (production keeps short
    # chunks on the one-call kernel, see the test below).
    monkeypatch.setattr(attn, "SPLIT_MIN_QUERIES", 2)


def test_short_chunks_keep_the_one_call_kernel(monkeypatch):
    monkeypatch.setattr(attn, "SPLIT_MIN_QUERIES", 512)
    q, k, v = torch.randn(100, 4, 8), torch.randn(900, 2, 8), torch.randn(900, 2, 8)
    assert torch.equal(split_attention(q, k, v), sdpa_attention(q, k, v))
    assert attn._split_verdicts == {}      # the split path was never tried


@pytest.mark.parametrize("n, end, heads, kv_heads", [(5, 12, 4, 2), (7, 300, 8, 2), (64, 65, 4, 4),
                                                     (12, 12, 4, 2), (1, 40, 4, 1)])
def test_split_attention_matches_the_explicit_reference(n, end, heads, kv_heads):
    q, k, v = qkv(n, end, heads, kv_heads, seed=n + end)
    torch.testing.assert_close(split_attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_first_use_is_checked_and_remembered():
    q, k, v = qkv(6, 30)
    split_attention(q, k, v)
    assert list(attn._split_verdicts.values()) == [True]


def test_a_wrong_log_sum_exp_falls_back_to_the_lower_right_kernel(monkeypatch, caplog):
    real = attn._attend_with_lse

    def log2_lse(q, k, v, causal):   # a backend whose statistics were in log2 units
        out, lse = real(q, k, v, causal)
        return out, lse * 1.4426950408889634 + (3.0 if causal else 0.0)

    monkeypatch.setattr(attn, "_attend_with_lse", log2_lse)
    q, k, v = qkv(6, 30, seed=3)
    split_attention(q, k, v)
    assert list(attn._split_verdicts.values()) == [False]
    assert "differs from the lower-right kernel" in caplog.text
    assert torch.equal(split_attention(q, k, v), sdpa_attention(q, k, v))


def test_a_backend_without_a_wired_op_falls_back(monkeypatch, caplog):
    def unwired(q, k, v, causal):
        raise NotImplementedError("no log-sum-exp op wired for SDPA backend 2")

    monkeypatch.setattr(attn, "_attend_with_lse", unwired)
    q, k, v = qkv(6, 30, seed=4)
    assert torch.equal(split_attention(q, k, v), sdpa_attention(q, k, v))
    assert list(attn._split_verdicts.values()) == [False]
    assert "split attention failed" in caplog.text


def test_split_is_deterministic_for_equal_inputs():
    q, k, v = qkv(9, 70, dtype=torch.bfloat16, seed=5)
    assert torch.equal(split_attention(q, k, v), split_attention(q, k, v))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, end", [(512, 4096), (1000, 3000), (64, 8192)])
def test_split_attention_on_cuda_is_taken_and_close(n, end):
    """On the GPU the split must be used (its first-use check passed) and stay close to the
    one-call kernel in bf16."""
    q, k, v = qkv(n, end, heads=32, kv_heads=8, d=128, dtype=torch.bfloat16, device="cuda", seed=n)
    out = split_attention(q, k, v)
    assert list(attn._split_verdicts.values()) == [True], attn._split_verdicts
    ref = reference(q, k, v)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2


def test_a_torch_that_cannot_name_its_backend_uses_the_lower_right_kernel(monkeypatch):
    def no_choice(*args, **kwargs):
        raise TypeError("_fused_sdp_choice() got an unexpected keyword argument 'enable_gqa'")

    monkeypatch.setattr(torch, "_fused_sdp_choice", no_choice)
    q, k, v = qkv(6, 30, seed=6)
    assert torch.equal(split_attention(q, k, v), sdpa_attention(q, k, v))
    assert list(attn._split_verdicts.values()) == [False]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cache_run_on_cuda_equals_a_split_run_bit_for_bit():
    """The GPU exactness contract with the split attention: a cache run computing [B, end)
    after loading [0, B) equals a cache-off run split at B (tokens and logits)."""
    from decoder_fakes import FakeCache, random_tokens

    from decoder import DecoderConfig, ReferenceDecoder, ReferenceEngine

    config = DecoderConfig.preset("tiny")
    model = ReferenceDecoder(config, device="cuda", dtype=torch.bfloat16, attention="sdpa")
    layout = config.kv_layout(8, dtype="bfloat16")
    prompt, boundary = random_tokens(150, 5), 96
    cached = ReferenceEngine(model, layout, 64, prefill_chunk_len=64)
    cached.attach_cache(FakeCache(layout, cached.kv_pool))
    cached.generate(prompt[:boundary], 1)
    with_cache = cached.generate(prompt, 6)
    assert with_cache.num_cached_tokens == boundary
    split = ReferenceEngine(model, layout, 64, prefill_chunk_len=64).generate(prompt, 6, split_at=boundary)
    assert with_cache.tokens == split.tokens and torch.equal(with_cache.logits, split.logits)
