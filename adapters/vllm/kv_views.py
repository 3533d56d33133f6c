"""vLLM 0.33.0's per-layer KV tensors as page views in kvstore's slot order.

vLLM allocates one int8 buffer and registers one strided view per layer
(``vllm.v1.worker.utils.allocate_kv_cache``): logical shape ``[B, H, N, C]`` in
the dtype of the spec, with a physical order chosen per model (``KVCacheLayout``:
LBNHC, LBHNC, BLHNC, ...; the strides say which). ``B`` counts kernel blocks:
when the attention kernel takes fewer tokens than vLLM's block, each block is
``r = P / N`` kernel blocks of ``N`` tokens in a row. What ``H`` and ``C`` hold
depends on the attention backend::

    backend                                     H         C        K and V of head h, token t
    FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION,    kv heads  2*D      C[:D] and C[D:]
      FLASHINFER (unquantized)
    CPU_ATTN (LBHNC only)                       kv heads  2*D      the head's [N, 2D] read as
                                                                   [2, N, D]: K rows, then V rows
    any MLA backend                             1         latent   one latent vector, no V

``page_view`` turns a layer into ``[block][kv][r][N][head][dim]`` without a copy; a
kvstore slot's layer ``[kv][P][head][dim]`` has the same element order once its
``P`` is split into ``(r, N)``. So K and V land where kvstore's other clients
(the reference decoder, SGLang) keep them. Other backends, quantized caches,
padded pages and differing K/V head sizes are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.layout import KVLayout

KV_IN_CONTENT = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "FLASHINFER"})
KV_IN_ROWS = frozenset({"CPU_ATTN"})


def kv_split_of(backend: str, is_mla: bool) -> str:
    """How ``backend`` keeps K and V in a ``[B, H, N, C]`` view: ``"latent"`` (MLA),
    ``"content"`` or ``"rows"`` (see the module doc); ValueError for others."""
    if is_mla:
        return "latent"
    if backend in KV_IN_CONTENT:
        return "content"
    if backend in KV_IN_ROWS:
        return "rows"
    raise ValueError(f"kvstore does not know how attention backend {backend} stores K and V; "
                     f"supported: {sorted(KV_IN_CONTENT | KV_IN_ROWS)} and MLA backends. "
                     "Choose one with --attention-backend")


def attention_backend_name(vllm_config: Any, layer_names: list[str]) -> str:
    """The attention backend of ``layer_names``: the layers' own (a running engine), else
    the configured ``--attention-backend``, else vLLM's selector for this platform."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.config.vllm import get_layers_from_vllm_config

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    names = {layer.get_attn_backend().get_name() for layer in layers.values()}
    if len(names) > 1:
        raise ValueError(f"KV layers use several attention backends {sorted(names)}; kvstore "
                         "needs one layout for all layers")
    if names:
        return names.pop()
    configured = getattr(vllm_config.attention_config, "backend", None)
    if configured is not None:
        return configured.get_class().get_name()
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backend

    return get_current_attn_backend(vllm_config).get_name()


def check_spec(spec: Any, layout: KVLayout) -> None:
    """Raise ValueError unless vLLM's ``AttentionSpec`` of the layers is one kvstore stores."""
    problems = []
    if getattr(spec, "kv_quant_mode", 0) or getattr(spec, "page_size_padded", None):
        problems.append("quantized or padded KV pages (use --kv-cache-dtype auto)")
    if getattr(spec, "num_head_slots", None) or getattr(spec, "state_content_bytes", None):
        problems.append("a backend-packed page encoding")
    if getattr(spec, "tokens_per_state", 1) != 1:
        problems.append("compressed states (several tokens per state)")
    if not layout.is_mla and spec.head_size_v != spec.head_size:
        problems.append(f"K and V of different head sizes ({spec.head_size}, {spec.head_size_v})")
    if spec.block_size != layout.page_size or spec.head_size != layout.head_dim:
        problems.append(f"block size {spec.block_size} / head size {spec.head_size}, where the "
                        f"kvstore layout {layout.fingerprint()} expects {layout.page_size} / "
                        f"{layout.head_dim}")
    if problems:
        raise ValueError(f"kvstore cannot store this vLLM KV cache ({type(spec).__name__}): "
                         + "; ".join(problems))


def page_view(kv: torch.Tensor, layout: KVLayout, split: str, name: str) -> torch.Tensor:
    """``[block][kv][r][N][head][dim]`` view (no copy) of one layer's ``[B, H, N, C]`` cache."""
    if kv.dim() != 4:
        raise ValueError(f"KV cache of layer {name} has shape {tuple(kv.shape)}; vLLM 0.33 "
                         "registers [blocks, heads, tokens, content] views")
    num_kernel_blocks, _, n, c = kv.shape
    P = layout.page_size
    if P % n or num_kernel_blocks % (P // n):
        raise ValueError(f"KV cache of layer {name}: kernel blocks of {n} tokens do not tile "
                         f"pages of {P}")
    r = P // n
    if split == "latent":
        view = kv.unsqueeze(3)                                   # [B, 1, N, 1, C]
    elif split == "content":
        view = kv.unflatten(3, (2, c // 2)).permute(0, 3, 2, 1, 4)   # [B, 2, N, H, D]
    else:
        view = _rows_view(kv, name)
    view = view.unflatten(0, (num_kernel_blocks // r, r)).permute(0, 2, 1, 3, 4, 5)
    want = (layout.num_kv, r, n, layout.num_kv_heads, layout.head_dim)
    if tuple(view.shape[1:]) != want or kv.dtype != layout.torch_dtype:
        raise ValueError(f"KV cache of layer {name} has shape {tuple(kv.shape)} {kv.dtype}, which "
                         f"does not match the kvstore layout {layout.fingerprint()}")
    return view


def _rows_view(kv: torch.Tensor, name: str) -> torch.Tensor:
    """CPU_ATTN: each head's ``[N, 2D]`` block read as ``[2, N, D]`` -> ``[B, 2, N, H, D]``."""
    b, h, n, c = kv.shape
    if kv.stride(3) != 1 or kv.stride(2) != c:
        raise ValueError(f"KV cache of layer {name}: CPU_ATTN reads a head's tokens as one "
                         f"run, but the strides are {kv.stride()} (layout LBHNC expected)")
    d = c // 2
    return kv.as_strided((b, h, 2, n, d), (kv.stride(0), kv.stride(1), n * d, d, 1),
                         kv.storage_offset()).permute(0, 2, 3, 1, 4)


def host_layer_view(host: torch.Tensor, kernel_tokens: int) -> torch.Tensor:
    """The L2 slots ``[slot][layer][kv][P][head][dim]`` with P split as ``page_view`` does."""
    P = host.shape[3]
    return host.unflatten(3, (P // kernel_tokens, kernel_tokens))
