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

from kvstore.copy_ops import CopyBackend, CopyPlan, _stream_context
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
        import npu_ops

        runs = plan_runs(src_layout, dst_layout, plan)
        with _stream_context(stream):
            npu_ops.move_runs(flat_bytes(src), flat_bytes(dst), runs.src_offsets, runs.dst_offsets, runs.sizes)
