"""Copies between an engine's page-major view and kvstore's L2 slots.

An adapter first builds a *page view* of the engine's buffer: a strided view (no
copy) of shape ``[page][layer][kv][token][head][dim]``, the order of one L2 slot
(``KVLayout`` page_first). Then a page moves with one ``copy_`` between two views of
equal shape, whatever the engine's own arrangement::

    engine buffer --as_strided/permute--> view[page]  <--copy_-->  host_tensor[slot]
"""

from __future__ import annotations

from typing import Sequence

import torch


def check_page_view(view: torch.Tensor, host_tensor: torch.Tensor, what: str) -> None:
    """Raise ValueError unless one page of ``view`` has the shape and dtype of one slot."""
    if tuple(view.shape[1:]) != tuple(host_tensor.shape[1:]) or view.dtype != host_tensor.dtype:
        raise ValueError(f"{what}: a page is {tuple(view.shape[1:])} {view.dtype}, but a kvstore "
                         f"slot is {tuple(host_tensor.shape[1:])} {host_tensor.dtype}; the cache's "
                         "layout does not match the engine's")


def pages_to_slots(view: torch.Tensor, pages: Sequence[int], host_tensor: torch.Tensor,
                   slots: Sequence[int]) -> None:
    """``host_tensor[slots[i]] = view[pages[i]]`` for every i."""
    for page, slot in zip(pages, slots):
        host_tensor[slot].copy_(view[page])


def slots_to_pages(host_tensor: torch.Tensor, slots: Sequence[int], view: torch.Tensor,
                   pages: Sequence[int]) -> None:
    """``view[pages[i]] = host_tensor[slots[i]]`` for every i (writes through to the engine)."""
    for slot, page in zip(slots, pages):
        view[page].copy_(host_tensor[slot])
