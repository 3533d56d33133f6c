"""SGLang's host KV pool seen page by page, without importing SGLang.

SGLang's ``HostKVCache`` keeps one buffer ``kv_buffer`` in one of several layouts
(``--hicache-mem-layout``). Each is viewed (strided, no copy) as kvstore's slot
order ``[page][layer][kv][token][head][dim]``; ``N`` pages of ``P`` tokens,
``size = N * P`` token rows::

    MHA  layer_first        [2][L][size][H][D]   -> view(2, L, N, P, H, D).permute(2, 1, 0, 3, 4, 5)
         page_first         [2][size][L][H][D]   -> view(2, N, P, L, H, D).permute(1, 3, 0, 2, 4, 5)
         page_first_direct  [2][N][L][P][H][D]   -> permute(1, 2, 0, 3, 4, 5)
         page_head          [2][N][H][P][L][D]   -> permute(1, 4, 0, 3, 2, 5)
    MLA  layer_first        [L][size][1][D]      -> view(L, N, P, 1, D).permute(1, 0, 2, 3, 4), kv axis added
         page_first         [size][L][1][D]      -> view(N, P, L, 1, D).permute(0, 2, 1, 3, 4), kv axis added
         page_first_direct  [N][L][P][1][D]      -> kv axis added

SGLang's older get/set calls pass one page as a flat tensor: MHA ``[2][L][P][H][D]``,
MLA ``[L][P][1][D]``; ``flat_page_view`` views that in slot order the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.keys import dtype_name
from kvstore.layout import KVLayout

MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def is_mla_pool(host_pool: Any) -> bool:
    """SGLang's MLA host pools carry ``kv_cache_dim`` (one latent row per token)."""
    return hasattr(host_pool, "kv_cache_dim") and not hasattr(host_pool, "head_num")


def layout_of(host_pool: Any) -> KVLayout:
    """The kvstore layout of the pages in a SGLang host pool (this PP stage's layers)."""
    common = dict(num_layers=int(host_pool.layer_num), page_size=int(host_pool.page_size),
                  dtype=dtype_name(host_pool.dtype), arrangement="page_first")
    if is_mla_pool(host_pool):
        return KVLayout(num_kv_heads=1, head_dim=int(host_pool.kv_cache_dim), is_mla=True, **common)
    if getattr(host_pool, "v_head_dim", host_pool.head_dim) != host_pool.head_dim:
        raise ValueError(f"SGLang host pool has K width {host_pool.head_dim} and V width "
                         f"{host_pool.v_head_dim}; kvstore pages need equal K and V widths")
    return KVLayout(num_kv_heads=int(host_pool.head_num), head_dim=int(host_pool.head_dim), **common)


def page_view(kv_buffer: torch.Tensor, mem_layout: str, layout: KVLayout) -> torch.Tensor:
    """``kv_buffer`` as ``[page][layer][kv][token][head][dim]`` (a view; writes go through)."""
    L, P, H, D = layout.num_layers, layout.page_size, layout.num_kv_heads, layout.head_dim
    if layout.is_mla:
        if mem_layout not in MLA_LAYOUTS:
            raise ValueError(f"SGLang MLA host layout {mem_layout!r} is not supported; use one of "
                             f"{MLA_LAYOUTS} (--hicache-mem-layout)")
        if mem_layout == "layer_first":
            view = kv_buffer.view(L, -1, P, 1, D).permute(1, 0, 2, 3, 4)
        elif mem_layout == "page_first":
            view = kv_buffer.view(-1, P, L, 1, D).permute(0, 2, 1, 3, 4)
        else:
            view = kv_buffer
        return view.unsqueeze(2)
    if mem_layout not in MHA_LAYOUTS:
        raise ValueError(f"SGLang MHA host layout {mem_layout!r} is not supported; use one of "
                         f"{MHA_LAYOUTS} (--hicache-mem-layout)")
    if mem_layout == "layer_first":
        return kv_buffer.view(2, L, -1, P, H, D).permute(2, 1, 0, 3, 4, 5)
    if mem_layout == "page_first":
        return kv_buffer.view(2, -1, P, L, H, D).permute(1, 3, 0, 2, 4, 5)
    if mem_layout == "page_first_direct":
        return kv_buffer.permute(1, 2, 0, 3, 4, 5)
    return kv_buffer.permute(1, 4, 0, 3, 2, 5)


def flat_page_view(flat: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """One flat page of SGLang's get/set calls as ``[layer][kv][token][head][dim]``."""
    L, P, H, D = layout.num_layers, layout.page_size, layout.num_kv_heads, layout.head_dim
    if layout.is_mla:
        return flat.view(L, P, 1, D).unsqueeze(1)
    return flat.view(2, L, P, H, D).permute(1, 0, 2, 3, 4)
