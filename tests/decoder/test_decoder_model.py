"""ReferenceDecoder: weights from a seed, forward_chunk over a paged pool in any arrangement."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from decoder_fakes import random_tokens, tiny_model

from decoder import DecoderConfig, DecoderShapeError, ReferenceDecoder
from decoder.model import apply_rope, pool_view, rope_tables

P = 8


def prefill(model, tokens, layout, page_table, pool=None, chunk=P):
    """Run ``tokens`` from position 0 in chunks of ``chunk``; return (logits [n, vocab], pool)."""
    if pool is None:
        pool = torch.zeros(layout.pool_shape(int(page_table.max()) + 1), dtype=layout.torch_dtype)
    tokens = torch.tensor(tokens)
    logits = [
        model.forward_chunk(tokens[s : s + chunk], s, pool, layout, page_table)
        for s in range(0, len(tokens), chunk)
    ]
    return torch.cat(logits), pool


def logits_digest(seed: int) -> str:
    model = ReferenceDecoder(DecoderConfig.preset("tiny", seed=seed))
    layout = model.config.kv_layout(P)
    logits, _ = prefill(model, list(range(20)), layout, torch.arange(3))
    return hashlib.sha256(logits.numpy().tobytes()).hexdigest()


# ---- weights -----------------------------------------------------------------
def test_parameter_shapes_untied_and_tied():
    c = DecoderConfig.preset("tiny")
    model = tiny_model()
    assert model.embed.shape == (c.vocab_size, c.hidden_size)
    assert model.lm_head.shape == (c.vocab_size, c.hidden_size)
    layer = model.layers[0]
    assert layer.wq.shape == (c.num_heads * c.head_dim, c.hidden_size)
    assert layer.wk.shape == layer.wv.shape == (c.num_kv_heads * c.head_dim, c.hidden_size)
    assert layer.wo.shape == (c.hidden_size, c.num_heads * c.head_dim)
    assert layer.w_gate.shape == layer.w_up.shape == (c.intermediate_size, c.hidden_size)
    assert len(model.layers) == c.num_layers
    assert not any(p.requires_grad for p in model.parameters())
    tied = tiny_model(tie_embeddings=True)
    assert tied.lm_head is None
    assert sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in tied.parameters()
    ) == c.vocab_size * c.hidden_size


def test_same_seed_same_weights_different_seed_different():
    a, b = ReferenceDecoder(DecoderConfig.preset("tiny")), ReferenceDecoder(DecoderConfig.preset("tiny"))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    other = ReferenceDecoder(DecoderConfig.preset("tiny", seed=1))
    for (name, pa), (_, po) in zip(a.named_parameters(), other.named_parameters()):
        assert not torch.equal(pa, po), name


def test_same_seed_same_logits_in_another_process():
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1);"
        "from test_decoder_model import logits_digest; print(logits_digest(0))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", code, here], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == logits_digest(0)
    assert logits_digest(1) != logits_digest(0)


# ---- forward_chunk ---------------------------------------------------------------
def test_logits_shape_dtype_and_kv_written():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    logits, pool = prefill(model, random_tokens(13, 0), layout, torch.tensor([2, 0]))
    assert logits.shape == (13, model.config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    k0 = pool_view(pool, layout, 0, 0)
    assert k0[2].abs().sum() > 0 and k0[0, :5].abs().sum() > 0  # positions 0..12
    assert torch.equal(k0[0, 5:], torch.zeros_like(k0[0, 5:]))  # slots 13..15 untouched
    assert torch.equal(k0[1], torch.zeros_like(k0[1]))  # page 1 is not in the table


def test_arrangements_give_bit_identical_logits_and_kv():
    model = tiny_model()
    tokens, table = random_tokens(29, 1), torch.tensor([3, 1, 0, 2])
    first = model.config.kv_layout(P, arrangement="layer_first")
    paged = model.config.kv_layout(P, arrangement="page_first")
    logits_l, pool_l = prefill(model, tokens, first, table)
    logits_p, pool_p = prefill(model, tokens, paged, table)
    assert torch.equal(logits_l, logits_p)
    for layer in range(first.num_layers):
        for kv in range(2):
            assert torch.equal(pool_view(pool_l, first, layer, kv), pool_view(pool_p, paged, layer, kv))


def test_shuffled_page_table_gives_identical_results():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    tokens = random_tokens(40, 2)
    logits_a, pool_a = prefill(model, tokens, layout, torch.arange(5))
    perm = torch.tensor([6, 2, 9, 0, 4])
    logits_b, pool_b = prefill(model, tokens, layout, perm)
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(pool_view(pool_a, layout, 1, 1)[:5], pool_view(pool_b, layout, 1, 1)[perm])


def test_stale_pool_contents_outside_the_context_do_not_matter():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    tokens, table = random_tokens(21, 3), torch.tensor([0, 1, 2])
    clean, _ = prefill(model, tokens, layout, table)
    dirty_pool = torch.randn(layout.pool_shape(3)) * 100  # slots 21..23 hold garbage
    dirty, _ = prefill(model, tokens, layout, table, pool=dirty_pool)
    assert torch.equal(clean, dirty)


def test_chunking_changes_logits_only_in_rounding():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    tokens, table = random_tokens(32, 4), torch.arange(4)
    by_page, _ = prefill(model, tokens, layout, table)
    one_shot, _ = prefill(model, tokens, layout, table, chunk=32)
    by_token, _ = prefill(model, tokens, layout, table, chunk=1)
    torch.testing.assert_close(one_shot, by_page, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_token, by_page, rtol=1e-4, atol=1e-4)


def test_attention_is_causal():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    tokens = random_tokens(16, 5)
    changed = tokens[:11] + [(t + 1) % 512 for t in tokens[11:]]
    a, _ = prefill(model, tokens, layout, torch.arange(2))
    b, _ = prefill(model, changed, layout, torch.arange(2))
    torch.testing.assert_close(a[:11], b[:11], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[11:], b[11:])


def test_forward_chunk_is_hidden_then_logits():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    tokens = torch.tensor(random_tokens(8, 6))
    pool_a, pool_b = (torch.zeros(layout.pool_shape(1)) for _ in range(2))
    logits = model.forward_chunk(tokens, 0, pool_a, layout, torch.tensor([0]))
    hidden = model.forward_hidden(tokens, 0, pool_b, layout, torch.tensor([0]))
    assert hidden.shape == (8, model.config.hidden_size)
    assert torch.equal(logits, model.compute_logits(hidden))


def test_before_layer_is_called_once_per_layer_in_order():
    model = tiny_model()
    layout = model.config.kv_layout(P)
    seen = []
    model.forward_chunk(torch.tensor([1, 2, 3]), 0, torch.zeros(layout.pool_shape(1)), layout,
                        torch.tensor([0]), before_layer=seen.append)
    assert seen == list(range(model.config.num_layers))


def test_rope_is_a_rotation_and_relative():
    config = DecoderConfig.preset("tiny")
    cos, sin = rope_tables(config)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)
    rq = apply_rope(q.expand(3, 1, 16), cos[[5, 50, 500]], sin[[5, 50, 500]])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(3, 1))
    rk = apply_rope(k.expand(3, 1, 16), cos[[2, 47, 497]], sin[[2, 47, 497]])
    dots = (rq * rk).sum(-1).flatten()  # same offset 3 each time
    torch.testing.assert_close(dots, dots[:1].expand(3), rtol=1e-5, atol=1e-5)


def test_bfloat16_model_runs_and_tracks_float32():
    config = DecoderConfig.preset("tiny")
    model = ReferenceDecoder(config, dtype=torch.bfloat16)
    assert model.embed.dtype == torch.bfloat16
    layout = config.kv_layout(P, dtype="bfloat16")
    tokens, table = random_tokens(12, 7), torch.arange(2)
    low, pool = prefill(model, tokens, layout, table)
    full, _ = prefill(tiny_model(), tokens, config.kv_layout(P), table)
    assert low.dtype == torch.float32 and pool.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    cos = torch.nn.functional.cosine_similarity(low, full, dim=-1)
    assert cos.min() > 0.95


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(start_pos=1020), "outside \\[0, max_positions=1024\\)"),
        (dict(start_pos=-1), "outside"),
        (dict(page_table=torch.tensor([0])), "at least 2 pages"),
        (dict(tokens=torch.tensor([[1, 2]])), "1-D LongTensor"),
        (dict(tokens=torch.tensor([1.0, 2.0])), "1-D LongTensor"),
        (dict(kv_pool=torch.zeros(3)), "kv_pool must have 6 dims"),
        (dict(kv_pool=torch.zeros(DecoderConfig.preset("tiny").kv_layout(4).pool_shape(2))),
         "kv_pool has shape"),
        (dict(kv_pool=torch.zeros(DecoderConfig.preset("tiny").kv_layout(P).pool_shape(2),
                                  dtype=torch.bfloat16)), "layout says float32"),
    ],
)
def test_forward_chunk_rejects_bad_arguments(change, message):
    model = tiny_model()
    layout = model.config.kv_layout(P)
    args = dict(tokens=torch.arange(5), start_pos=6, kv_pool=torch.zeros(layout.pool_shape(2)),
                layout=layout, page_table=torch.tensor([0, 1]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        model.forward_chunk(**args)


def test_layout_of_another_model_is_rejected():
    model = tiny_model()
    other = DecoderConfig.preset("tiny", num_layers=3).kv_layout(P)
    with pytest.raises(DecoderShapeError, match="does not fit"):
        model.forward_chunk(torch.arange(2), 0, torch.zeros(other.pool_shape(1)), other, torch.tensor([0]))


def test_unsupported_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype must be"):
        ReferenceDecoder(DecoderConfig.preset("tiny"), dtype=torch.int32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_has_the_cpu_weights_and_close_logits():
    cpu, gpu = tiny_model(), ReferenceDecoder(DecoderConfig.preset("tiny"), device="cuda")
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert torch.equal(a, b.cpu()), name
    layout = cpu.config.kv_layout(P)
    tokens = torch.tensor(random_tokens(20, 8))
    ref, _ = prefill(cpu, tokens.tolist(), layout, torch.arange(3))
    pool = torch.zeros(layout.pool_shape(3), device="cuda")
    got = torch.cat([
        gpu.forward_chunk(tokens[s : s + P].cuda(), s, pool, layout, torch.arange(3, device="cuda"))
        for s in range(0, 20, P)
    ])
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-3, atol=1e-3)
