"""DevicePool: the engine's KV pool as the cache client sees it -- page-id checks and
the L1<->L2 copies, the same for the embedded controller and the daemon's client.

The host side is anything with ``tensor`` and ``layout`` (a ``HostPool``, or the
client's mapping of the daemon's segment): the copies only need the bytes.
"""

from __future__ import annotations

import numbers
from typing import Protocol, Sequence

import torch

from controller.api import CacheError
from controller.load_handle import CompletedLoad, ControllerLoad, CudaStreamLoad, LazyLayerLoad
from kvstore.copy_ops import copy_backend_for
from kvstore.layout import KVLayout


class HostPages(Protocol):
    """Page slots in host memory, page_first (``HostPool`` and the client's mapping)."""

    tensor: torch.Tensor
    layout: KVLayout


class DevicePool:
    """One engine's paged KV pool, with the copy backend chosen for its device."""

    def __init__(self, layout: KVLayout, tensor: torch.Tensor, copy_backend: str | None) -> None:
        self.layout = layout
        self.num_pages = layout.check_pool(tensor, "device pool")
        self.tensor = tensor
        self._copy = copy_backend_for(tensor.device, copy_backend)
        self._stream = torch.cuda.Stream(tensor.device) if tensor.is_cuda else None

    def check_pages(self, pages: Sequence[int], what: str) -> list[int]:
        """``pages`` as a list of ints, or CacheError naming the first bad entry: each
        must be an int (not a float or bool), inside the pool, and named once."""
        try:
            out = list(pages)
        except TypeError:
            raise CacheError(f"{what} must be a sequence of device page ids, got "
                             f"{type(pages).__name__}") from None
        for i, page in enumerate(out):
            if isinstance(page, bool) or not isinstance(page, numbers.Integral):
                raise CacheError(f"{what}[{i}] is {page!r} ({type(page).__name__}); device page "
                                 "ids must be ints")
            if not 0 <= page < self.num_pages:
                raise CacheError(f"{what}[{i}] = {page} is outside the engine pool of "
                                 f"{self.num_pages} pages (valid ids: 0..{self.num_pages - 1})")
        out = [int(p) for p in out]
        if len(set(out)) != len(out):
            seen: set[int] = set()
            dup = next(p for p in out if p in seen or seen.add(p))
            raise CacheError(f"{what} names device page {dup} twice; each page holds one "
                             "page of tokens")
        return out

    def load(self, host: HostPages, slots: Sequence[int], pages: list[int]) -> ControllerLoad:
        """Start copying host ``slots`` into device ``pages``, layer by layer."""
        if not pages:
            return CompletedLoad()

        def copy_layer(layer: int, stream: object) -> None:
            self._copy.copy_pages(host.tensor, host.layout, slots, self.tensor, self.layout,
                                  pages, layer=layer, stream=stream)

        if self._stream is not None:
            return CudaStreamLoad(self.layout.num_layers, copy_layer, self._stream)
        return LazyLayerLoad(self.layout.num_layers, copy_layer)

    def save(self, pages: list[int], host: HostPages, slots: Sequence[int]) -> None:
        """Copy device ``pages`` into host ``slots``; returns once the bytes are there."""
        self._copy.copy_pages(self.tensor, self.layout, pages, host.tensor, host.layout, list(slots))
        if self.tensor.is_cuda:
            torch.cuda.current_stream(self.tensor.device).synchronize()
