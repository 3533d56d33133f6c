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

A pipeline that moves the same pages layer by layer plans once and launches per layer::

    plan = backend.plan_layers(src, src_layout, src_pages, dst, dst_layout, dst_pages)
    plan.launch(layer, stream)     # one layer: only the device call(s), no checks, no index math
    plan.launch_all(stream)        # every layer, in as few device calls as the path allows

Every check of ``copy_pages`` runs in ``plan_layers``; the plan holds the index (and
run) arrays of all layers, so a launch costs only what its device calls cost.

``TorchCopyBackend`` is the reference that defines these semantics and runs
everywhere; device backends (cuda_ops, npu_ops) must equal it bit for bit.
``copy_backend_for(device, name)`` picks the backend, once, by device type and config:

    name          device  module                      what moves the bytes
    torch         any     kvstore.copy_ops            torch indexing (the reference)
    runs          any     kvstore.copy_runs           coalesced byte runs, torch copies (NPU executor)
    cuda          cuda    kvstore.copy_cuda           auto: select_cuda_path() per copy (default)
    cuda_sm       cuda    kvstore.copy_cuda           bounded-grid gather/scatter kernel (UVA)
    cuda_dma      cuda    kvstore.copy_cuda           cudaMemcpyBatchAsync of coalesced runs
    cuda_staged   cuda    kvstore.copy_cuda           device regroup kernel + page-sized DMA runs
    npu           npu     kvstore.copy_npu            torch_npu non-blocking copies of runs (default)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
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
        return pages.to(device="cpu", dtype=torch.int64).contiguous()
    arr = np.asarray(pages, dtype=np.int64)
    if arr.ndim != 1:
        raise CopyArgumentError(f"{what} must be a flat sequence of page ids, got shape {arr.shape}")
    return torch.from_numpy(arr)


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
    # numpy on the CPU index tensors (zero-copy views): small torch ops cost far more.
    for idx, n, what in ((src_idx.numpy(), src_n, "src_pages"), (dst_idx.numpy(), dst_n, "dst_pages")):
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise CopyArgumentError(
                f"{what} holds pages in [{int(idx.min())}, {int(idx.max())}], the pool has {n}"
            )
    if dst_idx.numel() > 1:
        ordered = np.sort(dst_idx.numpy())
        if (ordered[1:] == ordered[:-1]).any():
            raise CopyArgumentError("dst_pages repeats a page; each destination page may be written once")
    num_layers = src_layout.num_layers
    if layer is None:
        layers = range(num_layers)
    elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and 0 <= layer < num_layers:
        layer = int(layer)
        layers = range(layer, layer + 1)
    else:
        raise CopyArgumentError(f"layer must be None (all) or in [0, {num_layers}), got {layer!r}")
    return CopyPlan(src_idx, dst_idx, src_n, dst_n, layers)


def layer_view(pool: torch.Tensor, layout: KVLayout, layer: int) -> torch.Tensor:
    """View of one layer as [kv][page][token][head][dim], whatever the arrangement."""
    if layout.arrangement == "layer_first":
        return pool[layer]
    return pool[:, layer].transpose(0, 1)


def page_major_view(pool: torch.Tensor, layout: KVLayout, layer: int) -> torch.Tensor:
    """View of one layer as [page][kv][token][head][dim], whatever the arrangement.

    Pages lead, so ``view[idx]`` gathers and ``view[idx] = x`` scatters only the pages
    in ``idx``: index kernels walk a strided view in place. (``index_select`` on a
    non-contiguous view first copies the whole view: for a page_first host pool that
    is the whole layer of every slot, at every load.)"""
    if layout.arrangement == "layer_first":
        return pool[layer].transpose(0, 1)
    return pool[:, layer]


class CopyBackend(ABC):
    """Moves pages between pools on one device type. ``copy_backend_for`` shares one
    instance per process; a backend may keep device resources (kernels, staging
    buffers, side streams) across calls."""

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

    def plan_layers(
        self,
        src: torch.Tensor,
        src_layout: KVLayout,
        src_pages: PageIndex,
        dst: torch.Tensor,
        dst_layout: KVLayout,
        dst_pages: PageIndex,
    ) -> "LayerCopyPlan":
        """Check a copy of every layer once and return a plan that launches it layer by
        layer; raises CopyArgumentError as ``copy_pages`` does. Nothing moves here. The
        plan keeps ``src`` and ``dst``: they must stay allocated while it launches.
        Backends override this where a launch can skip per-call work (this default
        re-slices the checked plan per layer, which is correct everywhere)."""
        plan = plan_copy(src, src_layout, src_pages, dst, dst_layout, dst_pages, None)
        return _LoopLayerPlan(self, src, src_layout, dst, dst_layout, plan)

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


class LayerCopyPlan(ABC):
    """A checked copy of every layer of some pages, launched a layer at a time.

    ``launch(layer, stream)`` enqueues layer ``layer``'s copy on ``stream`` (the current
    stream if None) and returns; completion is observed through that stream's events, as
    for ``copy_pages``. Layers may be launched in any order, each at most once per
    intended copy (launching one twice copies it twice). A plan changes nothing until
    launched and holds no device resources beyond its index tensors."""

    num_layers: int
    num_pages: int

    @abstractmethod
    def launch(self, layer: int, stream: Any = None) -> None:
        """Enqueue the copy of layer ``layer`` (in [0, num_layers)); ValueError if out of range."""

    def launch_all(self, stream: Any = None) -> None:
        """Enqueue every layer's copy (backends may do it in fewer device calls)."""
        for layer in range(self.num_layers):
            self.launch(layer, stream)

    def _check_layer(self, layer: int) -> None:
        if not (isinstance(layer, (int, np.integer)) and not isinstance(layer, bool)
                and 0 <= layer < self.num_layers):
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")


class _LoopLayerPlan(LayerCopyPlan):
    """The default plan: the checked ``CopyPlan`` narrowed to one layer per launch."""

    def __init__(self, backend: CopyBackend, src, src_layout, dst, dst_layout, plan: CopyPlan) -> None:
        self._backend = backend
        self._args = (src, src_layout, dst, dst_layout)
        self._plan = plan
        self.num_layers = src_layout.num_layers
        self.num_pages = int(plan.src_pages.numel())

    def launch(self, layer: int, stream: Any = None) -> None:
        self._check_layer(layer)
        if self.num_pages:
            one = dataclasses.replace(self._plan, layers=range(int(layer), int(layer) + 1))
            self._backend._copy(*self._args, one, stream)

    def launch_all(self, stream: Any = None) -> None:
        if self.num_pages:
            self._backend._copy(*self._args, self._plan, stream)


class TorchCopyBackend(CopyBackend):
    """The reference: gather and scatter with torch indexing, one layer at a time."""

    name = "torch"

    def _copy(self, src, src_layout, dst, dst_layout, plan, stream) -> None:
        stream_ctx = _stream_context(stream)
        with stream_ctx:
            src_idx = plan.src_pages.to(src.device)
            dst_idx = plan.dst_pages.to(dst.device)
            for layer in plan.layers:
                # Only the asked pages are read and written: [n][kv][token][head][dim].
                chunk = page_major_view(src, src_layout, layer)[src_idx]
                # A non-blocking copy into host memory could be read by the CPU scatter
                # below before it lands, so the device->host leg is synchronous.
                chunk = chunk.to(dst.device, non_blocking=dst.device.type != "cpu")
                page_major_view(dst, dst_layout, layer)[dst_idx] = chunk


def _stream_context(stream: Any):
    """Make ``stream`` current for the copy: a CUDA stream, or another device's (an NPU
    stream through ``torch.npu``); None leaves the current stream."""
    if stream is None:
        return contextlib.nullcontext()
    device_type = getattr(getattr(stream, "device", None), "type", None)
    module = getattr(torch, device_type, None) if isinstance(device_type, str) else None
    if module is None or not hasattr(module, "stream"):
        raise CopyArgumentError(f"stream {stream!r} is not a device stream that torch can make current")
    return module.stream(stream)


# ---- backend choice ---------------------------------------------------------
# name -> (device type, "module:factory"); device modules are imported only when chosen.
_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("any", "kvstore.copy_ops:TorchCopyBackend"),
    "runs": ("any", "kvstore.copy_runs:RunCopyBackend"),
    "cuda": ("cuda", "kvstore.copy_cuda:CudaCopyBackend"),
    "cuda_sm": ("cuda", "kvstore.copy_cuda:make_sm"),
    "cuda_dma": ("cuda", "kvstore.copy_cuda:make_dma"),
    "cuda_staged": ("cuda", "kvstore.copy_cuda:make_staged"),
    "npu": ("npu", "kvstore.copy_npu:NpuCopyBackend"),
}
# What ``copy_backend_for`` picks when config names no backend, by device type.
_DEFAULT_BY_DEVICE: dict[str, str] = {"cuda": "cuda", "npu": "npu"}
_cache: dict[str, CopyBackend] = {}

CUDA_PATHS: tuple[str, ...] = ("auto", "sm", "dma", "staged")
PLAN_PATHS: tuple[str, ...] = ("auto", "sm", "dma", "loop")


@dataclass(frozen=True)
class CudaPathPolicy:
    """How the CUDA backend moves pages (see kvstore.copy_cuda for the three paths)."""

    path: str = "auto"
    """'auto' (``select_cuda_path`` decides per copy), or always 'sm', 'dma' or 'staged'."""
    dma_min_run_bytes: int = 128 * 1024
    """auto: copy-engine runs straight between the pools when each page moves in contiguous
    pieces of at least this many bytes (see ``select_cuda_path``)."""
    staged_min_bytes: int = 16 << 20
    """auto: below this many bytes in one copy, small pieces still go by 'dma', not 'staged'."""
    sm_blocks: int = 4
    """Grid of the SM path: thread blocks (each holds one SM while the copy runs). Bounded
    so a concurrent model keeps the rest of the GPU."""
    sm_launch_bytes: int = 8 << 20
    """SM path: bytes per kernel launch (0: one launch per copy). Short launches free their
    SMs often, so a concurrent GEMM waits less for them (H100, 4 blocks: 16% -> 2-6% slowdown)."""
    sm_threads: int = 256
    """Threads per block of the SM and staging kernels (a multiple of 32, at most 512)."""
    staged_blocks: int = 16
    """Grid of the staged path's device-to-device regrouping kernel."""
    staging_bytes: int = 32 << 20
    """Device bytes of each of the staged path's two staging buffers."""
    dma_submit: str = "batch"
    """How runs go to the copy engines: 'batch' (cudaMemcpyBatchAsync), 'batch_overlap' (the
    same with the PreferOverlapWithCompute hint) or 'per_run' (one cudaMemcpyAsync each)."""
    dma_streams: int = 1
    """Streams the runs of one copy are split over (each fenced to the caller's stream)."""
    plan_path: str = "auto"
    """Path of planned copies (``plan_layers``: layer-wise loads, stores): 'auto' (see
    ``select_plan_path``), 'sm', 'dma', or 'loop' (each launch is a ``copy_pages`` of one
    layer, through ``path``)."""
    plan_sm_blocks: int = 8
    """Grid of planned SM copies. A layer-wise load is what the engine waits on, layer by
    layer, so it gets more blocks than ``sm_blocks``; see bench/pipeline_kernels.py."""

    def __post_init__(self) -> None:
        if self.path not in CUDA_PATHS:
            raise ValueError(f"CudaPathPolicy.path {self.path!r} is unknown; use one of {CUDA_PATHS}")
        if self.dma_submit not in ("batch", "batch_overlap", "per_run"):
            raise ValueError(f"CudaPathPolicy.dma_submit {self.dma_submit!r} is unknown; use batch, batch_overlap or per_run")
        if self.plan_path not in PLAN_PATHS:
            raise ValueError(f"CudaPathPolicy.plan_path {self.plan_path!r} is unknown; use one of {PLAN_PATHS}")
        if self.sm_launch_bytes < 0:
            raise ValueError(f"CudaPathPolicy.sm_launch_bytes must be >= 0, got {self.sm_launch_bytes}")
        for name in ("dma_min_run_bytes", "staged_min_bytes", "sm_blocks", "staged_blocks", "staging_bytes",
                     "dma_streams", "plan_sm_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CudaPathPolicy.{name} must be positive, got {getattr(self, name)}")
        if self.sm_threads % 32 or not 32 <= self.sm_threads <= 512:
            raise ValueError(f"CudaPathPolicy.sm_threads must be a multiple of 32 in [32, 512], got {self.sm_threads}")


def select_cuda_path(policy: CudaPathPolicy, page_span_bytes: int, total_bytes: int) -> str:
    """The one place that picks a CUDA copy path.

    A fixed ``policy.path`` wins. Under 'auto' (measured on an H100, bench/kernels.py):

    - each page moves in contiguous pieces of at least ``dma_min_run_bytes`` in both pools
      (``copy_runs.page_span_bytes``: page_first pools, or 64-token chunks) -> 'dma': such
      runs reach the memcpy rate on the copy engines, with no SM and no staging memory;
    - smaller pieces (a layer_first engine pool with 16-token pages: 32 KiB chunks, each a
      copy-engine job costing ~1 us of driver time) and at least ``staged_min_bytes`` in
      all -> 'staged': a short device kernel regroups the pages so the PCIe leg is one
      copy-engine run per page;
    - smaller pieces in a small copy -> 'dma' again: staging's fixed costs outweigh it there.

    The SM path is never chosen automatically: its blocks hold SMs while they copy and
    slow a concurrent GEMM (configure ``path='sm'`` for the lowest latency of small copies).
    """
    if policy.path != "auto":
        return policy.path
    if page_span_bytes >= policy.dma_min_run_bytes or total_bytes < policy.staged_min_bytes:
        return "dma"
    return "staged"


def select_plan_path(policy: CudaPathPolicy, page_span_bytes: int) -> str:
    """The path of a planned (layer by layer) CUDA copy.

    A fixed ``policy.plan_path`` wins; then a fixed ``policy.path`` ('staged' plans go
    through 'loop': staging pays only for large copies, and one layer is not). Under 'auto':

    - pieces of at least ``dma_min_run_bytes`` -> 'dma': one batched submission per layer
      of precomputed runs, no SMs;
    - smaller pieces (16-token pages of a layer_first pool: 32 KiB chunks) -> 'sm': one
      layer is hundreds of such chunks, and at ~1 us of driver time each the copy engines
      would be fed slower than PCIe drains them; one kernel launch per layer is ~10 us.
    """
    if policy.plan_path != "auto":
        return policy.plan_path
    if policy.path != "auto":
        return "loop" if policy.path == "staged" else policy.path
    return "dma" if page_span_bytes >= policy.dma_min_run_bytes else "sm"


def copy_backend_names() -> list[str]:
    return sorted(_BACKENDS)


def copy_backend_for(device: torch.device | str, name: str | None = None) -> CopyBackend:
    """The backend that moves pages for ``device`` (the engine pool's device): ``name`` if
    given, else the device's default ("cuda" for CUDA, "npu" for Ascend), else the torch
    reference. Built once and cached; device modules are imported only here."""
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
