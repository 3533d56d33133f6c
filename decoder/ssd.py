"""The SSD layer's sequence mixing (Mamba-2 with a scalar decay per head), chunked so that a
long prompt runs as a few batched matmuls, and the causal depthwise conv before it.

Per head h, with a_t = exp(dt_t * A_h) (A_h < 0) and X_t = dt_t * x_t::

    state_t = a_t * state_{t-1} + X_t B_t^T        state: [head_dim, N], float32
    y_t     = state_t C_t

Chunked form (the "state space duality"): cut the positions into blocks; inside a block
of length L with cumulative log-decay s_l = sum_{j<=l} dt_j A (one value per head)::

    y_l     = sum_{j<=l} exp(s_l - s_j) (C_l . B_j) X_j  +  exp(s_l) state_in C_l
    state_out = exp(s_L) state_in + sum_j exp(s_L - s_j) X_j B_j^T

The first term of y and the sum in state_out are batched matmuls over all blocks at
once; only the block-to-block carry of the state is a loop (one multiply-add per block).

Determinism: every op's shapes follow from the block boundaries, and those follow only
from the positions fed (absolute multiples of the block size, plus the call's own ends),
so two runs cut into the same calls compute the same bits; the state after a block end is
the value the next call would start from (what a snapshot holds).
"""

from __future__ import annotations

import torch


def block_ends(start: int, end: int, block: int) -> list[int]:
    """Ends (absolute positions, exclusive) of the scan blocks of positions [start, end): the
    multiples of ``block`` inside, then ``end``."""
    first = (start // block + 1) * block
    return list(range(first, end, block)) + [end]


def causal_conv(inputs: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, capture: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Depthwise causal conv1d in float32: inputs [n, D], conv_state [K-1, D] (the inputs
    before these), weight [D, K], bias [D]. Returns (out [n, D], the new state, the state
    after each offset in ``capture`` (1..n))."""
    n = inputs.shape[0]
    taps = weight.shape[1]
    padded = torch.cat([conv_state, inputs.float()], dim=0)        # [K-1+n, D]
    out = bias.float().expand(n, -1).clone()
    w = weight.float()
    for k in range(taps):                                            # fixed order of the sum
        out += padded[k:k + n] * w[:, k]
    captured = [padded[e:e + taps - 1].clone() for e in capture]
    return out, padded[n:].clone(), captured


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor, ends: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The chunked scan (module doc) in float32.

    x [n, H, P], dt [n, H] (> 0), A [H] (< 0), B and C [n, N], state [H, P, N] (before
    position 0 of x); ``ends``: block ends as offsets into x, increasing, the last == n.
    Returns (y [n, H, P], the state after each block end)."""
    n, H, P = x.shape
    N = B.shape[1]
    starts = [0] + ends[:-1]
    L = max(e - s for s, e in zip(starts, ends))
    nb = len(ends)
    dev = x.device
    # Blocks padded to L with dt = 0 (decay 1) and zero inputs: the padding changes nothing.
    lo = torch.tensor(starts, device=dev)[:, None]
    hi = torch.tensor(ends, device=dev)[:, None]
    pos = lo + torch.arange(L, device=dev)[None, :]                            # [nb, L]
    valid = pos < hi
    index = torch.minimum(pos, hi - 1)
    X = (x.float() * dt.float()[..., None])[index] * valid[..., None, None]      # [nb, L, H, P]
    dA = (dt.float() * A.float())[index] * valid[..., None]                     # [nb, L, H]
    Bb = B.float()[index] * valid[..., None]                                    # [nb, L, N]
    Cb = C.float()[index] * valid[..., None]
    s = torch.cumsum(dA, dim=1).transpose(1, 2)                                 # [nb, H, L]

    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    diff = (s[..., :, None] - s[..., None, :]).masked_fill(~causal, float("-inf"))
    weights = torch.bmm(Cb, Bb.transpose(1, 2))[:, None] * diff.exp()          # [nb, H, L, L]
    Xh = X.permute(0, 2, 1, 3)                                                  # [nb, H, L, P]
    y = torch.matmul(weights, Xh)                                               # [nb, H, L, P]

    to_end = (s[..., -1:] - s).exp()                                            # [nb, H, L]
    local = torch.matmul((Xh * to_end[..., None]).transpose(2, 3), Bb[:, None])  # [nb, H, P, N]
    block_decay = s[..., -1].exp()                                              # [nb, H]
    states_in, after = [], []
    h = state.float()
    for b in range(nb):                                                         # the carry
        states_in.append(h)
        h = block_decay[b][:, None, None] * h + local[b]
        after.append(h)
    h_in = torch.stack(states_in)                                               # [nb, H, P, N]
    y = y + s.exp()[..., None] * torch.matmul(Cb[:, None], h_in.transpose(2, 3))
    y = y.permute(0, 2, 1, 3)[valid]                                            # [n, H, P]
    return y, after


def ssd_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one position at a time, in float64: what ``ssd_scan`` must approximate
    (the tests compare them; it is far too slow for prompts)."""
    h = state.double()
    ys = []
    for t in range(x.shape[0]):
        decay = torch.exp(dt[t].double() * A.double())                         # [H]
        X = dt[t].double()[:, None] * x[t].double()                            # [H, P]
        h = decay[:, None, None] * h + X[:, :, None] * B[t].double()[None, None, :]
        ys.append(h @ C[t].double())
    return torch.stack(ys), h
