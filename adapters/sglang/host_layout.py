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

SGLang's older get/set calls pass one page as a flat tensor in the order of the host
layout, not one fixed order: ``get_data_page(i).flatten()`` is the page's slice of
``kv_buffer`` and ``set_from_flat_data_page`` reshapes by the layout (MHA layer_first
``[2][L][P][H][D]``, page_first ``[2][P][L][H][D]``, page_first_direct
``[2][1][L][P][H][D]``, page_head ``[2][1][H][P][L][D]``; MLA ``[L][P][1][D]``,
``[P][L][1][D]``, ``[1][L][P][1][D]``). So a flat page is a one-page ``kv_buffer`` of
that layout, and ``flat_page_view`` views it through ``page_view``: kvstore holds every
page in slot order, whichever layout or call wrote it and whichever reads it.
"""

from __future__ import annotations

import math
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


def one_page_buffer_shape(mem_layout: str, layout: KVLayout) -> tuple[int, ...]:
    """The shape of a one-page ``kv_buffer`` of ``mem_layout``: a flat page's order."""
    L, P, H, D = layout.num_layers, layout.page_size, layout.num_kv_heads, layout.head_dim
    if layout.is_mla:
        shapes = {"layer_first": (L, P, 1, D), "page_first": (P, L, 1, D),
                  "page_first_direct": (1, L, P, 1, D)}
    else:
        shapes = {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                  "page_first_direct": (2, 1, L, P, H, D), "page_head": (2, 1, H, P, L, D)}
    if mem_layout not in shapes:
        kind = "MLA" if layout.is_mla else "MHA"
        raise ValueError(f"SGLang {kind} host layout {mem_layout!r} is not supported; use one "
                         f"of {tuple(shapes)} (--hicache-mem-layout)")
    return shapes[mem_layout]


def flat_page_view(flat: torch.Tensor, mem_layout: str, layout: KVLayout) -> torch.Tensor:
    """One flat page of SGLang's get/set calls, from a host pool of ``mem_layout``, as
    ``[layer][kv][token][head][dim]`` (a view; writes go through to ``flat``)."""
    shape = one_page_buffer_shape(mem_layout, layout)
    if flat.numel() != math.prod(shape) or dtype_name(flat.dtype) != layout.dtype:
        raise ValueError(f"SGLang flat page is {flat.numel()} x {flat.dtype}, but a page of the "
                         f"{mem_layout} host pool is {shape} x {layout.dtype}; the page does not "
                         "come from the host pool this backend registered")
    return page_view(flat.view(shape), mem_layout, layout)[0]
