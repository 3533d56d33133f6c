"""HybridDecoder: the reference decoder with SSD (Mamba-2 style), full-attention and
sliding-window layers (decoder/hybrid_config.py says which is which).

A sequence's state lives in three places:

- the full-attention layers' K/V: a paged pool (``HybridPools.kv``), as in the dense model;
- the sliding-window layers' K/V: a second paged pool (``HybridPools.window``) on the same
  page table, of which only the last ``window`` positions are ever read;
- the SSD layers' conv and SSM states: ``HybridState``, a fixed-size tensor per layer,
  replaced by every call.

Bit-exactness contract, as for the dense model (decoder/model.py): for fixed weights, what a
call writes and returns depends only on its tokens, ``start_pos``, the K/V at the positions
it reads and the state it starts from; the SSD scan's blocks are cut on the absolute grid of
``ssd_chunk`` multiples and at the call's ends (decoder/ssd.py). So a prefill cut into the
same calls twice computes the same bits, and a state captured at a block end equals the
state a call that ends there hands on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvstore.layout import KVLayout

from .attention import attention, sdpa_attention, split_attention
from .hybrid_config import HybridConfig
from .model import DecoderShapeError, _Draw, check_model_options, apply_rope, pool_view, rms_norm, rope_tables
from .ssd import block_ends, causal_conv, ssd_scan


@dataclass
class HybridState:
    """The SSD layers' state of one sequence after some position: conv [K-1, conv_dim] and
    ssm [heads, head_dim, state] float32, one of each per SSD layer (in layer order)."""

    conv: list[torch.Tensor]
    ssm: list[torch.Tensor]

    @classmethod
    def zeros(cls, config: HybridConfig, device: torch.device | str) -> "HybridState":
        n = len(config.layers_of("S"))
        return cls(
            [torch.zeros(config.conv_kernel - 1, config.conv_dim, device=device) for _ in range(n)],
            [torch.zeros(config.ssm_heads, config.ssm_head_dim, config.ssm_state, device=device)
             for _ in range(n)])

    def clone(self) -> "HybridState":
        return HybridState([t.clone() for t in self.conv], [t.clone() for t in self.ssm])


@dataclass
class HybridPools:
    """The paged K/V of one engine: full attention (cached) and sliding window (not)."""

    kv: torch.Tensor
    kv_layout: KVLayout
    window: torch.Tensor | None = None
    window_layout: KVLayout | None = None


@dataclass
class ChunkOutput:
    hidden: torch.Tensor
    """Final-normed hidden states [n, hidden]."""
    captured: dict[int, HybridState] = field(default_factory=dict)
    """The SSD state after each position asked for in ``capture``."""


class _SSDLayer(nn.Module):
    def __init__(self, c: HybridConfig, draw: _Draw) -> None:
        super().__init__()
        h, inner, H = c.base.hidden_size, c.inner_size, c.ssm_heads
        self.norm = draw.norm(h)
        self.in_proj = draw.randn(2 * inner + 2 * c.ssm_state + H, h, std=h ** -0.5)
        self.conv_w = draw.randn(c.conv_dim, c.conv_kernel, std=c.conv_kernel ** -0.5)
        self.conv_b = draw.randn(c.conv_dim, std=0.1)
        # dt = softplus(raw + dt_bias) mostly in 0.01 .. 0.1 and A = -exp(A_log) mostly in
        # -0.1 .. -10 (Mamba-2's ranges): per-token decays from ~0.99 down to ~0.5.
        self.dt_bias = draw.randn(H, std=0.5)
        self.dt_bias.data.sub_(4.0)
        self.A_log = draw.randn(H, std=1.0)
        self.D = draw.randn(H, std=1.0)
        self.out_norm = draw.norm(inner)
        self.out_proj = draw.randn(h, inner, std=inner ** -0.5)


class _AttnLayer(nn.Module):
    def __init__(self, c: HybridConfig, draw: _Draw) -> None:
        super().__init__()
        b = c.base
        q_width, kv_width = b.num_heads * b.head_dim, b.num_kv_heads * b.head_dim
        self.norm = draw.norm(b.hidden_size)
        self.wq = draw.randn(q_width, b.hidden_size, std=b.hidden_size ** -0.5)
        self.wk = draw.randn(kv_width, b.hidden_size, std=b.hidden_size ** -0.5)
        self.wv = draw.randn(kv_width, b.hidden_size, std=b.hidden_size ** -0.5)
        self.wo = draw.randn(b.hidden_size, q_width, std=q_width ** -0.5)


class _MLP(nn.Module):
    def __init__(self, c: HybridConfig, draw: _Draw) -> None:
        super().__init__()
        b = c.base
        self.norm = draw.norm(b.hidden_size)
        self.w_gate = draw.randn(b.intermediate_size, b.hidden_size, std=b.hidden_size ** -0.5)
        self.w_up = draw.randn(b.intermediate_size, b.hidden_size, std=b.hidden_size ** -0.5)
        self.w_down = draw.randn(b.hidden_size, b.intermediate_size, std=b.intermediate_size ** -0.5)
        self.eps = b.rms_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.norm, self.eps)
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


class HybridDecoder(nn.Module):
    """The hybrid reference model; stateless between calls (the caller holds pools and state)."""

    def __init__(self, config: HybridConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, attention: str = "explicit",
                 draw_on: str = "cpu") -> None:
        super().__init__()
        check_model_options(dtype, attention, draw_on)
        self.config, self.dtype, self.attention = config, dtype, attention
        b = config.base
        gen = torch.Generator(device="cpu" if draw_on == "cpu" else device).manual_seed(b.seed)
        draw = _Draw(gen, dtype)
        # Draw order is part of the weights' identity: embed, layers in order, norm, lm_head.
        self.embed = draw.randn(b.vocab_size, b.hidden_size, std=1.0)
        self.mixers = nn.ModuleList()
        self.mlps = nn.ModuleList()
        for kind in config.kinds:
            self.mixers.append(_SSDLayer(config, draw) if kind == "S" else _AttnLayer(config, draw))
            self.mlps.append(_MLP(config, draw))
        self.norm = draw.norm(b.hidden_size)
        self.lm_head = None if b.tie_embeddings else draw.randn(b.vocab_size, b.hidden_size,
                                                               std=b.hidden_size ** -0.5)
        cos, sin = rope_tables(b)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.to(device=device)
        # layer index -> index inside its group (SSD state list, kv pool, window pool)
        self._group_index = {}
        for kind in "SAW":
            for j, i in enumerate(config.layers_of(kind)):
                self._group_index[i] = j

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward_hidden(
        self, tokens: torch.Tensor, start_pos: int, pools: HybridPools, page_table: torch.Tensor,
        state: HybridState, capture: Sequence[int] = (),
        before_layer: Callable[[int], None] | None = None,
    ) -> ChunkOutput:
        """Run tokens at positions ``start_pos .. start_pos+n-1``; ``state`` (the SSD state after
        ``start_pos - 1``) is replaced by the state after the last one. ``capture``: absolute
        positions in (start_pos, end] that are scan-block ends (multiples of ``ssd_chunk``, or
        end) after which to keep a copy of the state. ``before_layer(j)`` is called before
        full-attention layer j (its index in the kv pool) reads the pool."""
        c, b = self.config, self.config.base
        tokens, page_table = tokens.to(self.device), page_table.to(self.device, torch.long)
        n = tokens.numel()
        end = start_pos + n
        if tokens.dim() != 1 or n == 0 or start_pos < 0 or end > b.max_positions:
            raise DecoderShapeError(f"tokens must be 1-D, non-empty, at positions inside "
                                    f"[0, {b.max_positions}); got {n} at {start_pos}")
        ends = block_ends(start_pos, end, c.ssd_chunk)
        for pos in capture:
            if pos not in ends:
                raise DecoderShapeError(f"capture position {pos} is not a scan-block end of "
                                        f"[{start_pos}, {end}) (block ends: {ends})")
        offsets = [e - start_pos for e in ends]
        want = {e - start_pos: e for e in capture}
        positions = torch.arange(start_pos, end, device=self.device)
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        captured_conv: dict[int, list] = {e: [] for e in capture}
        captured_ssm: dict[int, list] = {e: [] for e in capture}

        h = self.embed[tokens]
        for i, (kind, mixer, mlp) in enumerate(zip(c.kinds, self.mixers, self.mlps)):
            j = self._group_index[i]
            x = rms_norm(h, mixer.norm, b.rms_eps)
            if kind == "S":
                out, conv_after, ssm_after = self._ssd(mixer, x, state, j, offsets, list(want))
                for off, pos in want.items():
                    captured_conv[pos].append(conv_after[off])
                    captured_ssm[pos].append(ssm_after[off])
            else:
                if kind == "A" and before_layer is not None:
                    before_layer(j)
                pool, layout = (pools.kv, pools.kv_layout) if kind == "A" else (pools.window, pools.window_layout)
                out = self._attend(mixer, x, kind, pool, layout, j, page_table, positions, cos, sin)
            h = h + out
            h = h + mlp(h)
        return ChunkOutput(rms_norm(h, self.norm, b.rms_eps),
                           {pos: HybridState(captured_conv[pos], captured_ssm[pos]) for pos in capture})

    def _ssd(self, layer: _SSDLayer, x: torch.Tensor, state: HybridState, j: int,
             offsets: list[int], capture: list[int]) -> tuple[torch.Tensor, dict, dict]:
        c = self.config
        n, inner, N, H = x.shape[0], c.inner_size, c.ssm_state, c.ssm_heads
        proj = F.linear(x, layer.in_proj)
        z, xbc, dt_raw = proj.split([inner, c.conv_dim, H], dim=-1)
        conv_offsets = [o for o in offsets if o in capture]
        conv_out, state.conv[j], conv_caps = causal_conv(xbc, state.conv[j], layer.conv_w, layer.conv_b,
                                                         conv_offsets)
        xbc = F.silu(conv_out)
        xs, B, C = xbc.split([inner, N, N], dim=-1)
        dt = F.softplus(dt_raw.float() + layer.dt_bias.float())
        A = -torch.exp(layer.A_log.float())
        xs = xs.view(n, H, c.ssm_head_dim)
        y, after = ssd_scan(xs, dt, A, B, C, state.ssm[j], offsets)
        state.ssm[j] = after[-1]
        y = y + layer.D.float()[:, None] * xs
        y = y.reshape(n, inner) * F.silu(z.float())
        out = F.linear(rms_norm(y.to(x.dtype), layer.out_norm, c.base.rms_eps), layer.out_proj)
        ssm_caps = {o: after[offsets.index(o)].clone() for o in capture}
        return out, dict(zip(conv_offsets, conv_caps)), ssm_caps

    def _attend(self, layer: _AttnLayer, x: torch.Tensor, kind: str, pool: torch.Tensor,
                layout: KVLayout, j: int, page_table: torch.Tensor, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, P = self.config.base, layout.page_size
        n, start, end = x.shape[0], int(positions[0]), int(positions[-1]) + 1
        q = apply_rope(F.linear(x, layer.wq).view(n, b.num_heads, b.head_dim), cos, sin)
        k = apply_rope(F.linear(x, layer.wk).view(n, b.num_kv_heads, b.head_dim), cos, sin)
        v = F.linear(x, layer.wv).view(n, b.num_kv_heads, b.head_dim)
        k_pages, v_pages = pool_view(pool, layout, j, 0), pool_view(pool, layout, j, 1)
        k_pages[page_table[positions // P], positions % P] = k.to(pool.dtype)
        v_pages[page_table[positions // P], positions % P] = v.to(pool.dtype)
        # Keys read: [0, end) for full attention, the window's (start - window, end) otherwise.
        lo = 0 if kind == "A" else max(0, start - self.config.window + 1)
        first_page = lo // P
        read = page_table[first_page: (end + P - 1) // P]
        skip = lo - first_page * P
        keys = k_pages[read].flatten(0, 1)[skip: end - first_page * P]
        values = v_pages[read].flatten(0, 1)[skip: end - first_page * P]
        if kind == "A":
            if self.attention == "sdpa":
                out = split_attention(q, keys.to(q.dtype), values.to(q.dtype))
            elif self.attention == "sdpa_lower_right":
                out = sdpa_attention(q, keys.to(q.dtype), values.to(q.dtype))
            else:
                allowed = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
                out = attention(q, keys, values, allowed)
        else:
            key_pos = torch.arange(lo, end, device=self.device)[None, :]
            allowed = (key_pos <= positions[:, None]) & (key_pos > positions[:, None] - self.config.window)
            if self.attention == "explicit":
                out = attention(q, keys, values, allowed)
            else:
                # KV heads repeated for their query groups: a masked call with GQA may find no
                # fused kernel (then the math path materialises every score).
                group = b.num_heads // b.num_kv_heads
                keys, values = (t.repeat_interleave(group, dim=1) for t in (keys, values))
                qh, kh, vh = (t.to(q.dtype).transpose(0, 1).unsqueeze(0) for t in (q, keys, values))
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed)
                out = out[0].transpose(0, 1).reshape(n, b.num_heads * b.head_dim)
        return F.linear(out.to(x.dtype), layer.wo)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


