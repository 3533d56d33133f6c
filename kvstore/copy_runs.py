"""Chunk index math and run coalescing shared by every copy path that moves byte runs
(the CUDA DMA and staged paths, the NPU path, and the CPU run executor that tests them).

A copy of pages ``src_pages[i] -> dst_pages[i]`` over ``layers`` is a set of chunk
pairs. Listed in destination order, neighbouring pairs whose source *and*
destination chunks both follow each other merge into one run::

    dst chunks  7 8 9 | 20 21 | 3        src chunks  40 41 42 | 11 12 | 13
                \\---/    \\--/    |                   \\-----/    \\---/    |
    runs:   (40->7, 3 chunks)  (11->20, 2)  (13->3, 1)       (13 follows 12 but 3 doesn't follow 21)

Page-first pools give a whole page (or a page's slice of consecutive layers) as one
run; a layer_first <-> page_first copy gives one run per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.copy_ops import CopyBackend, CopyPlan, LayerCopyPlan, _stream_context, plan_copy
from kvstore.layout import KVLayout


@dataclass(frozen=True)
class CopyRuns:
    """Byte runs of one copy: ``dst[dst_offsets[j] : +sizes[j]] = src[src_offsets[j] : +sizes[j]]``.
    int64 numpy arrays, in increasing destination order; runs never overlap.
    (numpy, not torch: on a few thousand indices it plans in tens of microseconds.)"""

    src_offsets: np.ndarray
    dst_offsets: np.ndarray
    sizes: np.ndarray

    @property
    def num_runs(self) -> int:
        return int(self.sizes.size)

    @property
    def total_bytes(self) -> int:
        return int(self.sizes.sum()) if self.num_runs else 0

    @property
    def mean_run_bytes(self) -> float:
        return self.total_bytes / self.num_runs if self.num_runs else 0.0


def _as_array(pages) -> np.ndarray:
    if isinstance(pages, torch.Tensor):
        return pages.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(pages, dtype=np.int64)


def chunk_indices(layout: KVLayout, num_pages: int, pages, layers: range) -> np.ndarray:
    """Chunk index (counted from the pool's start) of every (i, layer, kv), shape [n, layers, kv]."""
    s_layer, s_kv, s_page = layout.chunk_strides(num_pages)
    ls = np.arange(layers.start, layers.stop, dtype=np.int64)
    ks = np.arange(layout.num_kv, dtype=np.int64)
    return _as_array(pages)[:, None, None] * s_page + ls[None, :, None] * s_layer + ks[None, None, :] * s_kv


def coalesce(src_chunks: np.ndarray, dst_chunks: np.ndarray, chunk_bytes: int) -> CopyRuns:
    """Merge chunk pairs into maximal runs (see the module docstring). Destination chunks
    must be unique (plan_copy guarantees it)."""
    src = np.asarray(src_chunks, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_chunks, dtype=np.int64).reshape(-1)
    if dst.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return CopyRuns(empty, empty, empty)
    order = np.argsort(dst, kind="stable")
    dst, src = dst[order], src[order]
    starts_run = np.ones(dst.size, dtype=bool)
    starts_run[1:] = (dst[1:] != dst[:-1] + 1) | (src[1:] != src[:-1] + 1)
    first = np.flatnonzero(starts_run)
    ends = np.append(first[1:], dst.size)
    return CopyRuns(src[first] * chunk_bytes, dst[first] * chunk_bytes, (ends - first) * chunk_bytes)


def plan_runs(src_layout: KVLayout, dst_layout: KVLayout, plan: CopyPlan) -> CopyRuns:
    """The byte runs that carry out ``plan`` between two pools of these layouts."""
    src = chunk_indices(src_layout, plan.src_num_pages, plan.src_pages, plan.layers)
    dst = chunk_indices(dst_layout, plan.dst_num_pages, plan.dst_pages, plan.layers)
    return coalesce(src, dst, src_layout.chunk_bytes)


def layer_runs(src_layout: KVLayout, dst_layout: KVLayout, plan: CopyPlan) -> tuple[CopyRuns, int, int]:
    """(runs of layer 0, src byte step per layer, dst byte step per layer) of an all-layer plan.

    A chunk's index is affine in its layer (``chunk_strides``), and coalescing only
    compares neighbours' differences, so layer l's runs are layer 0's shifted by
    ``l * step`` on each side: one coalesce serves every layer."""
    first = CopyPlan(plan.src_pages, plan.dst_pages, plan.src_num_pages, plan.dst_num_pages, range(0, 1))
    src_step = src_layout.chunk_strides(plan.src_num_pages)[0] * src_layout.chunk_bytes
    dst_step = dst_layout.chunk_strides(plan.dst_num_pages)[0] * dst_layout.chunk_bytes
    return plan_runs(src_layout, dst_layout, first), src_step, dst_step


def page_span_bytes(src_layout: KVLayout, dst_layout: KVLayout, layers: range) -> int:
    """Bytes of one page that are one contiguous piece in both pools: the selected layers' K and
    V of a page_first pool, one chunk of a layer_first pool. Runs are at least this long
    (consecutive pages can only make them longer); it costs nothing to compute."""

    def span(layout: KVLayout) -> int:
        if layout.arrangement == "page_first" or len(layers) * layout.num_kv == 1:
            return len(layers) * layout.num_kv * layout.chunk_bytes
        return layout.chunk_bytes

    return min(span(src_layout), span(dst_layout))


def flat_bytes(pool: torch.Tensor) -> torch.Tensor:
    """A contiguous pool as a 1-D uint8 view (no copy)."""
    return pool.reshape(-1).view(torch.uint8)


class RunCopyBackend(CopyBackend):
    """Moves a copy as coalesced byte runs with torch copies, on any device pair.

    This is the NPU path's executor (``npu_ops.move_runs``) run through the same
    planning code on any device; on CPU it is what the tests hold to the reference.
    """

    name = "runs"

    def _copy(self, src, src_layout, dst, dst_layout, plan, stream: Any) -> None:
        self._move_runs(src, dst, plan_runs(src_layout, dst_layout, plan), stream)

    def plan_layers(self, src, src_layout, src_pages, dst, dst_layout, dst_pages) -> LayerCopyPlan:
        """Runs of layer 0 coalesced once; a launch shifts them to its layer (``layer_runs``)."""
        plan = plan_copy(src, src_layout, src_pages, dst, dst_layout, dst_pages, None)
        return _RunsLayerPlan(self, src, src_layout, dst, dst_layout, plan)

    def _move_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: CopyRuns, stream: Any) -> None:
        """Enqueue ``runs`` between the two pools on ``stream`` (device backends override)."""
        import npu_ops

        with _stream_context(stream):
            npu_ops.move_runs(flat_bytes(src), flat_bytes(dst), runs.src_offsets, runs.dst_offsets, runs.sizes)


class _RunsLayerPlan(LayerCopyPlan):
    """Layer 0's runs and the per-layer byte steps; ``launch(l)`` moves them shifted by l steps."""

    def __init__(self, backend: RunCopyBackend, src, src_layout, dst, dst_layout, plan: CopyPlan) -> None:
        self._backend, self._src, self._dst = backend, src, dst
        self._runs, self._src_step, self._dst_step = layer_runs(src_layout, dst_layout, plan)
        self._all = plan_runs(src_layout, dst_layout, plan) if plan.src_pages.numel() else self._runs
        self.num_layers = src_layout.num_layers
        self.num_pages = int(plan.src_pages.numel())

    def launch(self, layer: int, stream: Any = None) -> None:
        self._check_layer(layer)
        if not self.num_pages:
            return
        r = self._runs
        shifted = CopyRuns(r.src_offsets + layer * self._src_step, r.dst_offsets + layer * self._dst_step, r.sizes)
        self._backend._move_runs(self._src, self._dst, shifted, stream)

    def launch_all(self, stream: Any = None) -> None:
        if self.num_pages:
            self._backend._move_runs(self._src, self._dst, self._all, stream)
