"""The copy-op contract: move whole pages between an engine's KV pool and a host pool.

One signature for every device::

    backend.copy_pages(src, src_layout, src_pages, dst, dst_layout, dst_pages, layer=None, stream=None)

copies, for each i, page ``src_pages[i]`` of ``src`` into page ``dst_pages[i]``
of ``dst`` -- every layer (``layer=None``) or one layer -- K and V (or the MLA
latent). The two pools may use different arrangements (the engine's pool is
usually ``layer_first``, the host pool ``page_first``); every other layout
field must match. Direction follows from the pools' devices. A call returns once
the copy is enqueued on ``stream`` (the current stream if None); completion is
observed through that stream's events. Index lists may be unsorted, sparse or
empty; ``dst_pages`` must not repeat a page.

``TorchCopyBackend`` is the reference that defines these semantics and runs
everywhere; device backends (cuda_ops, npu_ops) must equal it bit for bit.
``copy_backend_for(device)`` picks the backend, once, by device type and config.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from kvstore.layout import KVLayout, LayoutError

PageIndex = Sequence[int] | torch.Tensor


class CopyArgumentError(ValueError):
    """A copy was refused before launch; the message names the argument at fault."""


@dataclass(frozen=True)
class CopyPlan:
    """Checked arguments of one copy: index tensors (int64, CPU) and page counts."""

    src_pages: torch.Tensor
    dst_pages: torch.Tensor
    src_num_pages: int
    dst_num_pages: int
    layers: range


def _as_index(pages: PageIndex, what: str) -> torch.Tensor:
    if isinstance(pages, torch.Tensor):
        if pages.dim() != 1 or pages.dtype not in (torch.int32, torch.int64):
            raise CopyArgumentError(
                f"{what} must be a 1-D int32/int64 tensor, got {pages.dtype} shape {tuple(pages.shape)}"
            )
        return pages.to(device="cpu", dtype=torch.int64)
    return torch.as_tensor(list(pages), dtype=torch.int64)


def plan_copy(
    src: torch.Tensor,
    src_layout: KVLayout,
    src_pages: PageIndex,
    dst: torch.Tensor,
    dst_layout: KVLayout,
    dst_pages: PageIndex,
    layer: int | None,
) -> CopyPlan:
    """Check every argument of a copy and normalise the index lists."""
    if src_layout.with_arrangement("layer_first") != dst_layout.with_arrangement("layer_first"):
        raise CopyArgumentError(
            f"source and destination layouts differ beyond arrangement: {src_layout} vs {dst_layout}"
        )
    try:
        src_n = src_layout.check_pool(src, "source pool")
        dst_n = dst_layout.check_pool(dst, "destination pool")
    except LayoutError as exc:
        raise CopyArgumentError(str(exc)) from exc
    src_idx = _as_index(src_pages, "src_pages")
    dst_idx = _as_index(dst_pages, "dst_pages")
    if src_idx.numel() != dst_idx.numel():
        raise CopyArgumentError(
            f"src_pages has {src_idx.numel()} entries, dst_pages {dst_idx.numel()}: they must match"
        )
    for idx, n, what in ((src_idx, src_n, "src_pages"), (dst_idx, dst_n, "dst_pages")):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise CopyArgumentError(
                f"{what} holds pages in [{int(idx.min())}, {int(idx.max())}], the pool has {n}"
            )
    if dst_idx.numel() and torch.unique(dst_idx).numel() != dst_idx.numel():
        raise CopyArgumentError("dst_pages repeats a page; each destination page may be written once")
    num_layers = src_layout.num_layers
    if layer is None:
        layers = range(num_layers)
    elif isinstance(layer, int) and 0 <= layer < num_layers:
        layers = range(layer, layer + 1)
    else:
        raise CopyArgumentError(f"layer must be None (all) or in [0, {num_layers}), got {layer!r}")
    return CopyPlan(src_idx, dst_idx, src_n, dst_n, layers)


def layer_view(pool: torch.Tensor, layout: KVLayout, layer: int) -> torch.Tensor:
    """View of one layer as [kv][page][token][head][dim], whatever the arrangement."""
    if layout.arrangement == "layer_first":
        return pool[layer]
    return pool[:, layer].transpose(0, 1)


class CopyBackend(ABC):
    """Moves pages between pools on one device type. Stateless apart from cached kernels."""

    name: str

    def copy_pages(
        self,
        src: torch.Tensor,
        src_layout: KVLayout,
        src_pages: PageIndex,
        dst: torch.Tensor,
        dst_layout: KVLayout,
        dst_pages: PageIndex,
        layer: int | None = None,
        stream: Any = None,
    ) -> None:
        """Enqueue the copy described in the module docstring; raises CopyArgumentError
        before anything moves if an argument is wrong."""
        plan = plan_copy(src, src_layout, src_pages, dst, dst_layout, dst_pages, layer)
        if plan.src_pages.numel() == 0:
            return
        self._copy(src, src_layout, dst, dst_layout, plan, stream)

    @abstractmethod
    def _copy(
        self,
        src: torch.Tensor,
        src_layout: KVLayout,
        dst: torch.Tensor,
        dst_layout: KVLayout,
        plan: CopyPlan,
        stream: Any,
    ) -> None:
        """Move the (already checked, non-empty) pages of ``plan``."""


class TorchCopyBackend(CopyBackend):
    """The reference: gather and scatter with torch indexing, one layer at a time."""

    name = "torch"

    def _copy(self, src, src_layout, dst, dst_layout, plan, stream) -> None:
        stream_ctx = _stream_context(stream)
        with stream_ctx:
            src_idx = plan.src_pages.to(src.device)
            dst_idx = plan.dst_pages.to(dst.device)
            for layer in plan.layers:
                chunk = layer_view(src, src_layout, layer).index_select(1, src_idx)
                view = layer_view(dst, dst_layout, layer)
                view[:, dst_idx] = chunk.to(dst.device, non_blocking=True)


def _stream_context(stream: Any):
    if stream is not None and isinstance(stream, torch.cuda.Stream):
        return torch.cuda.stream(stream)
    import contextlib

    return contextlib.nullcontext()


# ---- backend choice ---------------------------------------------------------
# name -> (device type, "module:factory"); device modules are imported only when chosen.
_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("any", "kvstore.copy_ops:TorchCopyBackend"),
}
# What ``copy_backend_for`` picks when config names no backend, by device type.
_DEFAULT_BY_DEVICE: dict[str, str] = {}
_cache: dict[str, CopyBackend] = {}


def copy_backend_names() -> list[str]:
    return sorted(_BACKENDS)


def copy_backend_for(device: torch.device | str, name: str | None = None) -> CopyBackend:
    """The backend that moves pages for ``device``: ``name`` if given, else the device's
    default, else the torch reference. Built once and cached."""
    device = torch.device(device)
    chosen = name or _DEFAULT_BY_DEVICE.get(device.type, "torch")
    if chosen not in _BACKENDS:
        raise ValueError(f"unknown copy backend {chosen!r}; choose one of {copy_backend_names()}")
    device_type, target = _BACKENDS[chosen]
    if device_type not in ("any", device.type):
        raise ValueError(f"copy backend {chosen!r} runs on {device_type}, not on {device.type}")
    if chosen not in _cache:
        module_name, factory = target.split(":")
        make: Callable[[], CopyBackend] = getattr(importlib.import_module(module_name), factory)
        _cache[chosen] = make()
    return _cache[chosen]
