"""ReferenceDecoder: a small Llama-style model whose attention reads a paged KV pool.

RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU MLP; weights drawn
from ``config.seed`` on a CPU generator and then moved, so CPU and CUDA models
start from bit-identical weights.

Bit-exactness contract (what the cache relies on): for fixed weights, the K/V
written and the logits returned by ``forward_chunk`` depend only on the chunk's
tokens, ``start_pos`` and the K/V already in the pool at positions
``0..start_pos-1``; not on the pool's arrangement, the page numbers in
``page_table``, or what else sits in the pool. Every op has shapes fixed by
(chunk length, context length), attention is explicit matmuls with a float32
softmax (no fused-kernel selection), and the chunk's own K/V is read back from
the pool like any cached page. Callers that want equal results from cached and
recomputed pages must therefore cut prefill into the same chunks both times
(the engine uses one page per chunk on the absolute page grid).

The fast path (``attention="sdpa"``, bf16, big chunks) is for GPUs, where the
recompute baseline must be as fast as the decoder can go: attention is PyTorch's
fused kernels (cuDNN, flash; a chunk after a cached prefix in two calls merged by
their log-sum-exp, decoder/attention.py), whose result may depend on the chunking,
so exactness there holds only between runs that cut prefill at the same positions.
``draw_on="device"`` draws the weights with a seeded generator on the model's device
(an 8B model never passes through host memory); such weights are reproducible on
that kind of device, not across kinds.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvstore.layout import KVLayout

from .attention import attention, sdpa_attention, split_attention
from .config import DecoderConfig

__all__ = ["ATTENTION_KINDS", "DRAW_ON", "DecoderShapeError", "ReferenceDecoder", "attention",
           "sdpa_attention", "split_attention", "apply_rope", "pool_view", "rms_norm", "rope_tables"]

# "sdpa" splits a chunk's attention over a cached prefix into two fused calls (attention.py);
# "sdpa_lower_right" is the one-call path it replaced, kept as the bench's baseline.
ATTENTION_KINDS: tuple[str, ...] = ("explicit", "sdpa", "sdpa_lower_right")
DRAW_ON: tuple[str, ...] = ("cpu", "device")



def check_model_options(dtype: torch.dtype, attention: str, draw_on: str) -> None:
    """Refuse what a reference model (dense or hybrid) cannot be built with."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if draw_on not in DRAW_ON:
        raise ValueError(f"draw_on must be one of {DRAW_ON}, got {draw_on!r}")

class DecoderShapeError(ValueError):
    """An argument of ``forward_chunk`` does not fit the model or the pool."""


class _Draw:
    """Where weights are drawn (the generator's device) and the dtype they are kept in.

    Each weight is drawn in float32 and cast at once, so an 8B model on a GPU never
    holds more than one float32 tensor at a time."""

    def __init__(self, gen: torch.Generator, dtype: torch.dtype) -> None:
        self.gen, self.dtype = gen, dtype

    def randn(self, *shape: int, std: float) -> nn.Parameter:
        x = torch.randn(shape, generator=self.gen, dtype=torch.float32, device=self.gen.device)
        return nn.Parameter(x.mul_(std).to(self.dtype), requires_grad=False)

    def norm(self, size: int) -> nn.Parameter:
        x = torch.randn(size, generator=self.gen, dtype=torch.float32, device=self.gen.device)
        return nn.Parameter((1.0 + 0.1 * x).to(self.dtype), requires_grad=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, returned in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(config: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_positions, head_dim] float32, built on CPU in float64."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / config.head_dim))
    angles = torch.outer(torch.arange(config.max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [n, heads, head_dim] with cos/sin [n, head_dim], in float32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    out = x32 * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)


def pool_view(kv_pool: torch.Tensor, layout: KVLayout, layer: int, kv: int) -> torch.Tensor:
    """A view [num_pages, page_size, kv_heads, head_dim] of one layer's K (kv=0) or V (kv=1).

    layer_first pool [layer][kv][page][token][head][dim] -> pool[layer, kv]       (contiguous)
    page_first  pool [page][layer][kv][token][head][dim] -> pool[:, layer, kv]    (strided)
    Writes through the view land in the pool.
    """
    if layout.arrangement == "layer_first":
        return kv_pool[layer, kv]
    return kv_pool[:, layer, kv]


class DecoderLayer(nn.Module):
    """One block: attention over the paged pool, then a SwiGLU MLP, both pre-norm."""

    def __init__(self, config: DecoderConfig, draw: _Draw) -> None:
        super().__init__()
        c = config
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.attn_norm = draw.norm(c.hidden_size)
        self.wq = draw.randn(q_width, c.hidden_size, std=c.hidden_size ** -0.5)
        self.wk = draw.randn(kv_width, c.hidden_size, std=c.hidden_size ** -0.5)
        self.wv = draw.randn(kv_width, c.hidden_size, std=c.hidden_size ** -0.5)
        self.wo = draw.randn(c.hidden_size, q_width, std=q_width ** -0.5)
        self.mlp_norm = draw.norm(c.hidden_size)
        self.w_gate = draw.randn(c.intermediate_size, c.hidden_size, std=c.hidden_size ** -0.5)
        self.w_up = draw.randn(c.intermediate_size, c.hidden_size, std=c.hidden_size ** -0.5)
        self.w_down = draw.randn(c.hidden_size, c.intermediate_size, std=c.intermediate_size ** -0.5)
        self.config = config

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.mlp_norm, self.config.rms_eps)
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


class ReferenceDecoder(nn.Module):
    """The reference model. Stateless between calls: all sequence state is in the KV pool."""

    def __init__(
        self, config: DecoderConfig, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32, attention: str = "explicit", draw_on: str = "cpu",
    ) -> None:
        """``attention``: "explicit" (float32 matmuls, the bit-exact reference), "sdpa"
        (fused kernels, the fast path) or "sdpa_lower_right" (the slower one-call fused
        path, a baseline; see decoder/attention.py). ``draw_on``: "cpu" (same weights on every device)
        or "device" (drawn on ``device``; what a GPU-sized model needs)."""
        super().__init__()
        check_model_options(dtype, attention, draw_on)
        self.config, self.dtype, self.attention = config, dtype, attention
        gen = torch.Generator(device="cpu" if draw_on == "cpu" else device).manual_seed(config.seed)
        draw = _Draw(gen, dtype)
        # Draw order is part of the weights' identity: embed, layers in order, norm, lm_head.
        self.embed = draw.randn(config.vocab_size, config.hidden_size, std=1.0)
        self.layers = nn.ModuleList(DecoderLayer(config, draw) for _ in range(config.num_layers))
        self.norm = draw.norm(config.hidden_size)
        self.lm_head = (
            None if config.tie_embeddings
            else draw.randn(config.vocab_size, config.hidden_size, std=config.hidden_size ** -0.5)
        )
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.to(device=device)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def check_layout(self, layout: KVLayout) -> None:
        """Raise DecoderShapeError unless ``layout`` describes this model's K/V."""
        c = self.config
        expected = (c.num_layers, c.num_kv_heads, c.head_dim)
        got = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        if layout.is_mla or got != expected:
            raise DecoderShapeError(
                f"layout (layers, kv heads, head dim, mla) = {(*got, layout.is_mla)} does not fit "
                f"the model's {(*expected, False)}; build it with config.kv_layout(page_size)"
            )

    def forward_chunk(
        self,
        tokens: torch.Tensor,
        start_pos: int,
        kv_pool: torch.Tensor,
        layout: KVLayout,
        page_table: torch.Tensor,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run tokens at positions ``start_pos .. start_pos+n-1``; return logits [n, vocab] float32.

        Writes their K/V into ``kv_pool`` (position p goes to page
        ``page_table[p // P]``, slot ``p % P``), then attends causally over
        positions ``0 .. start_pos+n-1`` read back from the pool through
        ``page_table``. Positions before ``start_pos`` must already be in the pool.
        ``before_layer(i)`` is called at layer i before its K/V is written or
        read (the cache's per-layer wait). Changes only the pool slots of the
        chunk's positions. ``tokens`` and ``page_table`` are moved to the model's
        device if needed. Same as ``compute_logits(forward_hidden(...))``.
        """
        hidden = self.forward_hidden(tokens, start_pos, kv_pool, layout, page_table, before_layer)
        return self.compute_logits(hidden)

    @torch.inference_mode()
    def forward_hidden(
        self,
        tokens: torch.Tensor,
        start_pos: int,
        kv_pool: torch.Tensor,
        layout: KVLayout,
        page_table: torch.Tensor,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """``forward_chunk`` without the output projection: the final-normed hidden
        states [n, hidden] in the model's dtype. Prefill uses it to project only the
        rows it needs (the vocab projection is ~15% of the small preset's prefill)."""
        n, end, tokens, page_table = self._check_chunk(tokens, start_pos, kv_pool, layout, page_table)
        c, P = self.config, layout.page_size
        positions = torch.arange(start_pos, end, device=self.device)
        write_pages, write_slots = page_table[positions // P], positions % P
        read_pages = page_table[: (end + P - 1) // P]
        attend = self._attention_fn(positions, end)
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

        h = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, c.rms_eps)
            q = apply_rope(F.linear(x, layer.wq).view(n, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(F.linear(x, layer.wk).view(n, c.num_kv_heads, c.head_dim), cos, sin)
            v = F.linear(x, layer.wv).view(n, c.num_kv_heads, c.head_dim)
            if before_layer is not None:
                before_layer(i)
            k_pages, v_pages = pool_view(kv_pool, layout, i, 0), pool_view(kv_pool, layout, i, 1)
            k_pages[write_pages, write_slots] = k.to(kv_pool.dtype)
            v_pages[write_pages, write_slots] = v.to(kv_pool.dtype)
            # Gather whole pages in page_table order, then cut to the context: [end, kv, d]
            keys = k_pages[read_pages].flatten(0, 1)[:end]
            values = v_pages[read_pages].flatten(0, 1)[:end]
            out = attend(q, keys, values).to(h.dtype)
            h = h + F.linear(out, layer.wo)
            h = h + layer.mlp(h)
        return rms_norm(h, self.norm, c.rms_eps)

    def _attention_fn(
        self, positions: torch.Tensor, end: int
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The chunk's attention: explicit with a [n, end] mask (built once per chunk), or SDPA."""
        if self.attention == "sdpa":
            return split_attention
        if self.attention == "sdpa_lower_right":
            return sdpa_attention
        # allowed[i, j]: query i (position start_pos + i) sees key position j <= start_pos + i
        allowed = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        return lambda q, k, v: attention(q, k, v, allowed)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project final-normed hidden states [n, hidden] to logits [n, vocab] float32."""
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()

    def _check_chunk(
        self, tokens: torch.Tensor, start_pos: int, kv_pool: torch.Tensor,
        layout: KVLayout, page_table: torch.Tensor,
    ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """Check the arguments; return (n, end, tokens, page_table), both on the model's device."""
        if tokens.dim() != 1 or tokens.numel() == 0 or tokens.dtype != torch.long:
            raise DecoderShapeError(
                f"tokens must be a non-empty 1-D LongTensor, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        n = tokens.numel()
        end = start_pos + n
        if start_pos < 0 or end > self.config.max_positions:
            raise DecoderShapeError(
                f"positions {start_pos}..{end - 1} are outside [0, max_positions="
                f"{self.config.max_positions}); raise DecoderConfig.max_positions"
            )
        self.check_layout(layout)
        layout.check_pool(kv_pool, "kv_pool")
        if kv_pool.device != self.device:
            raise DecoderShapeError(f"kv_pool is on {kv_pool.device}, the model on {self.device}")
        num_ctx_pages = (end + layout.page_size - 1) // layout.page_size
        if page_table.dim() != 1 or page_table.numel() < num_ctx_pages:
            raise DecoderShapeError(
                f"page_table must be 1-D with at least {num_ctx_pages} pages for positions "
                f"0..{end - 1}, got shape {tuple(page_table.shape)}"
            )
        return n, end, tokens.to(self.device), page_table.to(device=self.device, dtype=torch.long)
