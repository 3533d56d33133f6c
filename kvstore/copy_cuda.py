"""CUDA copy backends: the contract of kvstore.copy_ops on cuda_ops' kernels.

Three paths, one signature (the path is chosen in ``copy_ops.select_cuda_path``):

- ``sm``: launches of a bounded-grid gather/scatter kernel (``sm_blocks`` blocks, at most
  ``sm_launch_bytes`` each) that read and write pinned host memory directly (UVA), 16-byte
  accesses. Lowest latency for small copies; holds ``sm_blocks`` SMs while it copies.
- ``dma``: copy-engine copies of the coalesced runs, one batched submission. Takes
  no SMs; as fast as a memcpy once runs are large (>= ~128 KiB).
- ``staged``: the engine pool's chunks are regrouped on the device into a compact
  page_first staging buffer by a short device-to-device kernel, and the PCIe leg is a
  DMA of whole pages (a page's slice of the selected layers is one run on both sides)::

      D2H:  pool --kernel (stream)--> staging[j%2] --DMA (side stream)--> host slots
      H2D:  host slots --DMA (side)--> staging[j%2] --kernel (stream)--> pool

  Pieces of at most ``staging_bytes`` alternate between two buffers, so the kernel
  of piece j+1 overlaps the DMA of piece j; events order the two streams and the
  caller's stream ends after the last piece.

Planned copies (``plan_layers``, for layer-wise loads and stores) take 'sm' or 'dma'
(``copy_ops.select_plan_path``) with everything but the device calls done at planning:
'sm' puts the page ids on the device once and launches one kernel per layer; 'dma'
coalesces layer 0's runs once, and layer l's are the same runs shifted by l layer
strides (``copy_runs.layer_runs``), one batched submission per layer.

Host tensors must be pinned or registered (HostPool pins its segment); a pageable
host tensor is refused before anything moves.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import torch

import cuda_ops
from kvstore.copy_ops import (
    CopyArgumentError,
    CopyBackend,
    CopyPlan,
    CudaPathPolicy,
    LayerCopyPlan,
    _LoopLayerPlan,
    plan_copy,
    select_cuda_path,
    select_plan_path,
)
from kvstore.copy_runs import CopyRuns, chunk_indices, layer_runs, page_span_bytes, plan_runs
from kvstore.layout import KVLayout


class CudaCopyBackend(CopyBackend):
    """Pages between CUDA pools and pinned host pools; ``policy.path`` fixes the path or
    leaves it to the selector ("auto")."""

    name = "cuda"

    def __init__(self, policy: CudaPathPolicy | None = None) -> None:
        self.policy = policy or CudaPathPolicy()
        self._side: dict[int, list[torch.cuda.Stream]] = {}
        self._staging_bufs: dict[int, list[torch.Tensor]] = {}
        self._staging_free: dict[int, torch.cuda.Event] = {}
        self._lock = threading.Lock()
        self.last_path: str | None = None
        """The path the last copy took (for tests and metrics)."""

    # ---- entry ----------------------------------------------------------------
    def _copy(self, src, src_layout, dst, dst_layout, plan: CopyPlan, stream: Any) -> None:
        device = self._check_devices(src, dst)
        stream = self._check_stream(stream, device)
        total = plan.src_pages.numel() * len(plan.layers) * src_layout.num_kv * src_layout.chunk_bytes
        path = select_cuda_path(self.policy, page_span_bytes(src_layout, dst_layout, plan.layers), total)
        host_layout = dst_layout if dst.device.type == "cpu" else src_layout
        if path == "staged" and host_layout.arrangement != "page_first":
            # Staging moves one run per page, which only a page_first host pool holds
            # contiguously; any other host arrangement goes run by run.
            path = "dma"
        self.last_path = path
        with torch.cuda.device(device):
            if path == "dma":
                self._dma(src, dst, plan_runs(src_layout, dst_layout, plan), stream)
            elif path == "sm":
                self._sm(src, src_layout, dst, dst_layout, plan, stream)
            else:
                with self._lock:
                    self._staged(src, src_layout, dst, dst_layout, plan, stream)

    def plan_layers(self, src, src_layout, src_pages, dst, dst_layout, dst_pages) -> LayerCopyPlan:
        """Check once, choose 'sm' or 'dma' (``select_plan_path``) and precompute what a
        launch needs; a launch then costs its device call(s) only."""
        plan = plan_copy(src, src_layout, src_pages, dst, dst_layout, dst_pages, None)
        device = self._check_devices(src, dst)
        path = select_plan_path(self.policy, page_span_bytes(src_layout, dst_layout, range(0, 1)))
        if path == "loop" or plan.src_pages.numel() == 0:
            return _LoopLayerPlan(self, src, src_layout, dst, dst_layout, plan)
        return _CudaLayerPlan(self, device, path, src, src_layout, dst, dst_layout, plan)

    def _check_stream(self, stream: Any, device: torch.device) -> torch.cuda.Stream:
        stream = stream if stream is not None else torch.cuda.current_stream(device)
        if not isinstance(stream, torch.cuda.Stream) or stream.device != device:
            raise CopyArgumentError(f"stream must be a torch.cuda.Stream on {device}, got {stream!r}")
        return stream

    @staticmethod
    def _check_devices(src: torch.Tensor, dst: torch.Tensor) -> torch.device:
        cuda = [t.device for t in (src, dst) if t.device.type == "cuda"]
        if not cuda:
            raise CopyArgumentError("a CUDA copy backend needs at least one pool on a CUDA device")
        if len(set(cuda)) > 1:
            raise CopyArgumentError(f"pools on two CUDA devices {cuda[0]} and {cuda[1]}; copy within one device")
        for t, what in ((src, "source"), (dst, "destination")):
            if t.device.type == "cpu" and t.numel() and not cuda_ops.is_device_visible(t.data_ptr()):
                raise CopyArgumentError(
                    f"the {what} host pool is pageable: pin it (HostPool(pin=True) registers its "
                    "segment with cudaHostRegister; or tensor.pin_memory())"
                )
            if t.device.type not in ("cpu", "cuda"):
                raise CopyArgumentError(f"the {what} pool is on {t.device}; a CUDA backend moves cuda<->cpu")
        return cuda[0]

    # ---- paths ----------------------------------------------------------------
    def _sm(self, src, src_layout, dst, dst_layout, plan: CopyPlan, stream) -> None:
        with torch.cuda.stream(stream):
            idx = torch.stack([plan.src_pages, plan.dst_pages]).pin_memory().to(stream.device, non_blocking=True)
        n = plan.src_pages.numel()
        page_bytes = len(plan.layers) * src_layout.num_kv * src_layout.chunk_bytes
        step = max(1, self.policy.sm_launch_bytes // page_bytes) if self.policy.sm_launch_bytes else n
        for a in range(0, n, step):
            b = min(n, a + step)
            cuda_ops.copy_chunks(
                _space(src, src_layout, plan.src_num_pages, plan.layers.start, idx[0, a:b]),
                _space(dst, dst_layout, plan.dst_num_pages, plan.layers.start, idx[1, a:b]),
                b - a, len(plan.layers), src_layout.num_kv, src_layout.chunk_bytes,
                stream, self.policy.sm_blocks, self.policy.sm_threads,
            )

    def _dma(self, src, dst, runs: CopyRuns, stream) -> None:
        srcs = src.data_ptr() + runs.src_offsets.astype(np.uint64)
        dsts = dst.data_ptr() + runs.dst_offsets.astype(np.uint64)
        self._memcpy(dsts, srcs, runs.sizes, stream)

    def _memcpy(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream) -> None:
        """Runs onto the copy engines, split over ``policy.dma_streams`` streams. A part that
        can't go on ``stream`` itself (all of them, for the legacy default stream, which the
        batch API refuses) goes on a side stream that waits for ``stream`` and that ``stream``
        then waits for."""
        mode = self.policy.dma_submit
        num = max(1, min(self.policy.dma_streams, sizes.size))
        on_stream = 0 if (stream.cuda_stream == 0 and mode != "per_run") else 1
        parts = np.array_split(np.arange(sizes.size), num)
        sides = self._side_streams(stream.device, num - on_stream, skip=stream)
        for side in sides:
            side.wait_stream(stream)
        for part, s in zip(parts, ([stream] if on_stream else []) + sides):
            cuda_ops.memcpy_runs(dsts[part], srcs[part], sizes[part], s, mode)
        for side in sides:
            stream.wait_stream(side)

    def _staged(self, src, src_layout, dst, dst_layout, plan: CopyPlan, stream) -> None:
        to_host = dst.device.type == "cpu"
        dev_pool, dev_layout = (src, src_layout) if to_host else (dst, dst_layout)
        host_pool, host_layout = (dst, dst_layout) if to_host else (src, src_layout)
        dev_pages, host_pages = (plan.src_pages, plan.dst_pages) if to_host else (plan.dst_pages, plan.src_pages)
        dev_n, host_n = (plan.src_num_pages, plan.dst_num_pages) if to_host else (plan.dst_num_pages, plan.src_num_pages)
        layers = plan.layers
        stage_layout = KVLayout(len(layers), src_layout.num_kv_heads, src_layout.head_dim, src_layout.page_size,
                                src_layout.dtype, "page_first", src_layout.is_mla)
        page_bytes = stage_layout.page_bytes  # one staged page: the selected layers, K and V
        # Where each page's staged bytes go in (come from) the host pool: one run per page,
        # since a page_first host slot holds consecutive layers contiguously.
        host_off = chunk_indices(host_layout, host_n, host_pages, range(layers.start, layers.start + 1))[:, 0, 0]
        host_off = host_off * src_layout.chunk_bytes + host_pool.data_ptr()
        n = host_off.size
        per_piece = max(1, self.policy.staging_bytes // page_bytes)
        side = self._side_stream(stream.device)
        with torch.cuda.stream(stream):
            dev_idx = dev_pages.pin_memory().to(stream.device, non_blocking=True)
            # Allocated on ``stream``, so the allocator never hands out a block that
            # another stream's kernels may still be using.
            bufs = self._staging(stream, side, max(per_piece * page_bytes, self.policy.staging_bytes))
        side.wait_stream(stream)
        freed: list[torch.cuda.Event] = []
        for j, a in enumerate(range(0, n, per_piece)):
            b = min(n, a + per_piece)
            stage = _Stage(bufs[j % 2].data_ptr(), stage_layout, b - a)
            runs = _page_runs(host_off[a:b], stage.base, page_bytes)
            if j >= 2:  # buffer j % 2 is free once piece j - 2 has left it
                (stream if to_host else side).wait_event(freed[j - 2])
            if to_host:
                self._stage_kernel(dev_pool, dev_layout, dev_n, layers, dev_idx[a:b], stage, True, stream)
                side.wait_event(_record(stream))
                self._memcpy(runs[1], runs[0], runs[2], side)
                freed.append(_record(side))
            else:
                self._memcpy(runs[0], runs[1], runs[2], side)
                stream.wait_event(_record(side))
                self._stage_kernel(dev_pool, dev_layout, dev_n, layers, dev_idx[a:b], stage, False, stream)
                freed.append(_record(stream))
        stream.wait_stream(side)
        self._staging_free[stream.device.index] = _record(stream)

    def _staging(self, stream: torch.cuda.Stream, side: torch.cuda.Stream, nbytes: int) -> list[torch.Tensor]:
        """The two staging buffers of ``stream``'s device, kept across copies (allocating them
        per copy made the caching allocator call cudaMalloc, which synchronises). Their use
        is ordered after the previous staged copy, on whatever stream that ran; staged
        copies are enqueued under ``self._lock``."""
        key = stream.device.index
        bufs = self._staging_bufs.get(key)
        if bufs is None or bufs[0].numel() < nbytes:
            bufs = [torch.empty(nbytes, dtype=torch.uint8, device=stream.device) for _ in range(2)]
            self._staging_bufs[key] = bufs  # the old ones are freed once their streams are done
        if key in self._staging_free:
            stream.wait_event(self._staging_free[key])
        for buf in bufs:
            buf.record_stream(stream)
            buf.record_stream(side)
        return bufs

    def _stage_kernel(self, pool, layout, num_pages, layers, pages, stage: "_Stage", to_stage: bool, stream) -> None:
        pool_space = _space(pool, layout, num_pages, layers.start, pages)
        s_layer, s_kv, s_page = stage.layout.chunk_strides(stage.num_pages)
        stage_space = cuda_ops.ChunkSpace(stage.base, None, s_layer, s_kv, s_page)
        src, dst = (pool_space, stage_space) if to_stage else (stage_space, pool_space)
        cuda_ops.copy_chunks(src, dst, stage.num_pages, len(layers), layout.num_kv, layout.chunk_bytes,
                             stream, self.policy.staged_blocks, self.policy.sm_threads)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        return self._side_streams(device, 1)[0]

    def _side_streams(self, device: torch.device, num: int, skip=None) -> list[torch.cuda.Stream]:
        """``num`` long-lived side streams of ``device`` (never ``skip``)."""
        key = device.index if device.index is not None else torch.cuda.current_device()
        pool = self._side.setdefault(key, [])
        while len(pool) < num + 1:
            pool.append(torch.cuda.Stream(device=key))
        skip_handle = skip.cuda_stream if skip is not None else None
        return [s for s in pool if s.cuda_stream != skip_handle][:num]


class _CudaLayerPlan(LayerCopyPlan):
    """A planned CUDA copy (see the module docstring): 'sm' or 'dma' per layer.

    Planning only checks; the device index (sm) and the address arrays (dma) are made at
    the first launch that needs them, on the launching thread (a load's issuer thread),
    the index uploaded on the launch stream itself. ``launch_all`` is one SM launch of
    every layer unless the policy fixes 'dma': a batched submission costs ~1 us of driver
    time per run (thousands in a store), a launch ~10 us whatever its size."""

    def __init__(self, backend: CudaCopyBackend, device: torch.device, path: str,
                 src, src_layout: KVLayout, dst, dst_layout: KVLayout, plan: CopyPlan) -> None:
        self._backend, self._device, self.path = backend, device, path
        self._src, self._dst = src, dst  # kept alive: the launches read their memory
        self._layouts, self._plan = (src_layout, dst_layout), plan
        self.num_layers = src_layout.num_layers
        self.num_pages = int(plan.src_pages.numel())
        policy = backend.policy
        self._all_path = "dma" if path == "dma" and "dma" in (policy.plan_path, policy.path) else "sm"
        self._addrs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._idx: torch.Tensor | None = None
        self._idx_ready: torch.cuda.Event | None = None
        self._idx_streams: set[int] = set()

    def launch(self, layer: int, stream: Any = None) -> None:
        self._check_layer(layer)
        stream = self._backend._check_stream(stream, self._device)
        if self.path == "dma":
            srcs, dsts, sizes = self._dma_addresses()
            self._backend._memcpy(dsts[layer], srcs[layer], sizes, stream)
        else:
            self._sm(layer, 1, stream)

    def launch_all(self, stream: Any = None) -> None:
        stream = self._backend._check_stream(stream, self._device)
        if self._all_path == "dma":
            srcs, dsts, sizes = self._dma_addresses()
            self._backend._memcpy(dsts.reshape(-1), srcs.reshape(-1), np.tile(sizes, self.num_layers), stream)
        else:
            self._sm(0, self.num_layers, stream)

    def _dma_addresses(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[layer, run] source and destination addresses and the run sizes; row l is layer
        0's runs shifted by l layer strides."""
        if self._addrs is None:
            runs, src_step, dst_step = layer_runs(*self._layouts, self._plan)
            steps = np.arange(self.num_layers, dtype=np.uint64)[:, None]
            srcs = self._src.data_ptr() + runs.src_offsets.astype(np.uint64) + steps * np.uint64(src_step)
            dsts = self._dst.data_ptr() + runs.dst_offsets.astype(np.uint64) + steps * np.uint64(dst_step)
            self._addrs = (srcs, dsts, runs.sizes.astype(np.uint64))
        return self._addrs

    def _device_index(self, stream: torch.cuda.Stream) -> torch.Tensor:
        """[2, pages] page ids on the device: uploaded on the first launch's stream; a later
        stream waits for that upload once and is recorded with the allocator."""
        if self._idx is None:
            with torch.cuda.stream(stream):
                host_idx = torch.stack([self._plan.src_pages, self._plan.dst_pages]).pin_memory()
                self._idx = host_idx.to(self._device, non_blocking=True)
            self._idx_ready = _record(stream)
        elif stream.cuda_stream not in self._idx_streams:
            stream.wait_event(self._idx_ready)
            self._idx.record_stream(stream)
        self._idx_streams.add(stream.cuda_stream)
        return self._idx

    def _sm(self, layer0: int, num_layers: int, stream: torch.cuda.Stream) -> None:
        (src_layout, dst_layout), plan = self._layouts, self._plan
        policy = self._backend.policy
        with _on_device(self._device):
            idx = self._device_index(stream)
            cuda_ops.copy_chunks(
                _space(self._src, src_layout, plan.src_num_pages, layer0, idx[0]),
                _space(self._dst, dst_layout, plan.dst_num_pages, layer0, idx[1]),
                self.num_pages, num_layers, src_layout.num_kv, src_layout.chunk_bytes,
                stream, policy.plan_sm_blocks, policy.sm_threads,
            )


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` only where it is not current already (it costs a few us)."""
    if device.index is None or torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _page_runs(host_addrs: np.ndarray, stage_base: int, page_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stage addresses, host addresses, sizes) of one piece: page i of the piece is
    ``page_bytes`` at ``stage_base + i * page_bytes``; pages whose host slots follow each
    other merge into one run."""
    n = host_addrs.size
    starts_run = np.ones(n, dtype=bool)
    starts_run[1:] = host_addrs[1:] != host_addrs[:-1] + page_bytes
    first = np.flatnonzero(starts_run)
    sizes = np.diff(np.append(first, n)) * page_bytes
    stage = (stage_base + first * page_bytes).astype(np.uint64)
    return stage, host_addrs[first].astype(np.uint64), sizes


class _Stage:
    """A compact page_first staging buffer of ``num_pages`` pages of ``layout`` at ``base``."""

    __slots__ = ("base", "layout", "num_pages")

    def __init__(self, base: int, layout: KVLayout, num_pages: int) -> None:
        self.base, self.layout, self.num_pages = base, layout, num_pages


def _record(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _space(pool: torch.Tensor, layout: KVLayout, num_pages: int, layer0: int, pages: torch.Tensor) -> cuda_ops.ChunkSpace:
    s_layer, s_kv, s_page = layout.chunk_strides(num_pages)
    base = pool.data_ptr() + layer0 * s_layer * layout.chunk_bytes
    return cuda_ops.ChunkSpace(base, pages, s_layer, s_kv, s_page)


def make_sm() -> CudaCopyBackend:
    return CudaCopyBackend(CudaPathPolicy(path="sm"))


def make_dma() -> CudaCopyBackend:
    return CudaCopyBackend(CudaPathPolicy(path="dma"))


def make_staged() -> CudaCopyBackend:
    return CudaCopyBackend(CudaPathPolicy(path="staged"))
