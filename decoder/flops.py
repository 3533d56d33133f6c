"""Parameter and FLOP counts of the reference decoder, from its config alone (nothing allocated).

How prefill FLOPs are counted (the bench states the same in its JSON)::

    matmul   = 2 * matmul_params_per_token * n                  (q, k, v, o, gate, up, down)
    attention = 4 * layers * heads * head_dim * (causal pairs)  (QK^T and PV, 2 FLOPs a MAC)
    causal pairs of a chunk of n tokens after start_pos cached ones
             = n * start_pos + n * (n + 1) / 2

The embedding is a gather and the output projection runs on the last row only,
so neither is counted; norms, RoPE and SwiGLU's elementwise work are left out too.
"""

from __future__ import annotations

from .config import DecoderConfig


def layer_matmul_params(config: DecoderConfig) -> int:
    """Weights of one block's matmuls: q, k, v, o projections and the SwiGLU MLP."""
    c = config
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = c.hidden_size * (2 * q_width + 2 * kv_width)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return attn + mlp


def num_parameters(config: DecoderConfig) -> int:
    """Every weight: embedding, blocks (matmuls and two norms each), final norm, lm_head."""
    c = config
    embed = c.vocab_size * c.hidden_size
    blocks = c.num_layers * (layer_matmul_params(c) + 2 * c.hidden_size)
    head = 0 if c.tie_embeddings else embed
    return embed + blocks + c.hidden_size + head


def prefill_flops(config: DecoderConfig, num_tokens: int, start_pos: int = 0) -> dict[str, float]:
    """FLOPs to prefill ``num_tokens`` positions after ``start_pos`` cached ones (see module doc)."""
    if num_tokens < 0 or start_pos < 0:
        raise ValueError(f"num_tokens and start_pos must be >= 0, got {num_tokens}, {start_pos}")
    c = config
    matmul = 2.0 * c.num_layers * layer_matmul_params(c) * num_tokens
    pairs = num_tokens * start_pos + num_tokens * (num_tokens + 1) / 2
    attention = 4.0 * c.num_layers * c.num_heads * c.head_dim * pairs
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def kv_bytes_per_token(config: DecoderConfig, itemsize: int = 2) -> int:
    """Bytes of K and V of one token across all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
