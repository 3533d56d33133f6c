"""The hybrid decoder alone: the chunked SSD scan against the one-position recurrence, the
same cuts giving the same bits, and the snapshot codec's round trip."""

import numpy as np
import pytest
import torch

from decoder.hybrid_config import HybridConfig
from decoder.hybrid_model import DecoderShapeError, HybridDecoder, HybridPools, HybridState
from decoder.hybrid_state import SnapshotCodec
from decoder.ssd import block_ends, ssd_reference, ssd_scan


def test_chunked_scan_matches_the_recurrence():
    g = torch.Generator().manual_seed(0)
    n, H, Pd, N = 45, 3, 4, 5
    x, B, C = torch.randn(n, H, Pd, generator=g), torch.randn(n, N, generator=g), torch.randn(n, N, generator=g)
    dt, A = torch.rand(n, H, generator=g) * 0.2, -torch.rand(H, generator=g) * 4
    s0 = torch.randn(H, Pd, N, generator=g)
    y, after = ssd_scan(x, dt, A, B, C, s0, [e - 3 for e in block_ends(3, 3 + n, 8)])
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, s0)
    assert torch.allclose(y.double(), y_ref, atol=1e-4) and torch.allclose(after[-1].double(), h_ref, atol=1e-4)


def pools(config, P=8, num_pages=16, dtype="float32"):
    kv, win = config.kv_layout(P, dtype), config.window_layout(P, dtype)
    return HybridPools(torch.zeros(kv.pool_shape(num_pages), dtype=kv.torch_dtype), kv,
                       torch.zeros(win.pool_shape(num_pages), dtype=win.torch_dtype), win)


def test_same_cuts_same_bits_and_captures_equal_the_state_handed_on():
    torch.set_num_threads(1)
    config = HybridConfig.preset("tiny-hybrid-swa")
    model = HybridDecoder(config)
    toks = torch.tensor(np.random.default_rng(0).integers(0, 512, 70))
    table = torch.arange(16)

    def run(cuts):
        state, rows, pool = HybridState.zeros(config, "cpu"), [], pools(config)
        for lo, hi in zip(cuts, cuts[1:]):
            out = model.forward_hidden(toks[lo:hi], lo, pool, table, state,
                                       capture=[hi] if hi == 48 else [])
            rows.append(out.hidden)
            if hi == 48:
                captured = out.captured[48]
        return torch.cat(rows), state, captured

    h1, s1, c1 = run([0, 16, 48, 70])
    h2, s2, _ = run([0, 16, 48, 70])
    assert torch.equal(h1, h2) and all(torch.equal(a, b) for a, b in zip(s1.ssm, s2.ssm))
    # the state captured at 48 is the one a call starting at 48 starts from
    state = c1.clone()
    p = pools(config)
    scratch = HybridState.zeros(config, "cpu")
    model.forward_hidden(toks[:16], 0, p, table, scratch)      # the same K/V as run 1's
    model.forward_hidden(toks[16:48], 16, p, table, scratch)
    out = model.forward_hidden(toks[48:], 48, p, table, state)
    assert torch.equal(out.hidden, h1[48:])
    with pytest.raises(DecoderShapeError, match="scan-block end"):
        model.forward_hidden(toks[:40], 0, p, table, HybridState.zeros(config, "cpu"), capture=[20])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_snapshot_round_trip_restores_state_and_window(dtype):
    config = HybridConfig.preset("tiny-hybrid-swa")
    codec = SnapshotCodec(config, dtype)
    g = torch.Generator().manual_seed(1)
    state = HybridState.zeros(config, "cpu")
    state = HybridState([torch.randn(t.shape, generator=g) for t in state.conv],
                        [torch.randn(t.shape, generator=g) for t in state.ssm])
    src, dst = pools(config, dtype=dtype), pools(config, dtype=dtype)
    src.window.copy_(torch.randn(src.window.shape, generator=g))
    table = torch.arange(16)
    flat = torch.zeros(codec.layout().page_bytes // 4)
    codec.pack(state, src, table, 40, flat)
    back = codec.unpack(flat, dst, table, 40)
    assert all(torch.equal(a, b) for a, b in zip(back.ssm + back.conv, state.ssm + state.conv))
    # window 32 at end 40: positions 8..39 (pages 1..4) restored, nothing else written
    assert torch.equal(dst.window[:, :, 1:5], src.window[:, :, 1:5])
    assert not dst.window[:, :, 0].any() and not dst.window[:, :, 5:].any()
