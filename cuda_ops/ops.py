"""Thin wrappers over the kernels in csrc/kv_copy.cu; every call checks its return code.

Addresses are plain ints (``tensor.data_ptr()`` plus byte offsets): the caller
(kvstore.copy_cuda) owns shapes, layouts and bounds, and checks them before it
calls here. Host addresses must be pinned or registered (cudaHostRegister).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from cuda_ops.build import load_library


class CudaOpsError(RuntimeError):
    """A CUDA call of the copy ops returned an error."""


@dataclass(frozen=True)
class ChunkSpace:
    """Where chunk (layer l, kv k, i-th page) of one side of a copy lives.

    Its address is ``base + (l*s_layer + k*s_kv + page*s_page) * chunk_bytes`` with
    ``page = pages[i]`` (a device int64 tensor) or ``page = i`` when ``pages`` is None
    (a compact staging buffer). ``base`` already points at the first selected layer.
    """

    base: int
    pages: torch.Tensor | None
    s_layer: int
    s_kv: int
    s_page: int


def _check(err: int, what: str) -> None:
    if err != 0:
        msg = load_library().kv_error_string(err).decode()
        raise CudaOpsError(f"{what} failed: CUDA error {err} ({msg})")


def _stream_handle(stream: torch.cuda.Stream) -> ctypes.c_void_p:
    return ctypes.c_void_p(stream.cuda_stream)


def copy_chunks(
    src: ChunkSpace,
    dst: ChunkSpace,
    num_pages: int,
    num_layers: int,
    num_kv: int,
    chunk_bytes: int,
    stream: torch.cuda.Stream,
    num_blocks: int,
    num_threads: int = 512,
) -> None:
    """SM path: enqueue one launch of ``num_blocks`` x ``num_threads`` that copies
    ``num_pages * num_layers * num_kv`` chunks (one warp per chunk at a time)."""
    if num_threads % 32 or not 32 <= num_threads <= 512:
        raise ValueError(f"num_threads must be a multiple of 32 in [32, 512], got {num_threads}")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    vec = 16
    while chunk_bytes % vec or src.base % vec or dst.base % vec:
        vec //= 2
    strides = (ctypes.c_int64 * 6)(src.s_layer, src.s_kv, src.s_page, dst.s_layer, dst.s_kv, dst.s_page)
    err = load_library().kv_copy_chunks(
        ctypes.c_void_p(src.base),
        ctypes.c_void_p(src.pages.data_ptr() if src.pages is not None else 0),
        ctypes.c_void_p(dst.base),
        ctypes.c_void_p(dst.pages.data_ptr() if dst.pages is not None else 0),
        strides,
        num_pages,
        num_layers,
        num_kv,
        chunk_bytes,
        vec,
        num_blocks,
        num_threads,
        _stream_handle(stream),
    )
    _check(err, "kv_copy_chunks")


MEMCPY_MODES = {"per_run": 0, "batch": 1, "batch_overlap": 2}


def memcpy_runs(
    dst_addrs: np.ndarray,
    src_addrs: np.ndarray,
    sizes: np.ndarray,
    stream: torch.cuda.Stream,
    mode: str = "batch",
) -> None:
    """DMA path: enqueue copy-engine copies ``dst_addrs[i] <- src_addrs[i]`` of ``sizes[i]``
    bytes. ``mode``: 'batch' (one cudaMemcpyBatchAsync), 'batch_overlap' (with the
    PreferOverlapWithCompute hint) or 'per_run' (one cudaMemcpyAsync each). The batch modes
    need a runtime >= 12.8 (else they fall back to per_run) and refuse the legacy default stream."""
    dsts = np.ascontiguousarray(dst_addrs, dtype=np.uint64)
    srcs = np.ascontiguousarray(src_addrs, dtype=np.uint64)
    lens = np.ascontiguousarray(sizes, dtype=np.uint64)
    if not dsts.shape == srcs.shape == lens.shape:
        raise ValueError("dst_addrs, src_addrs and sizes must have one length")
    if mode not in MEMCPY_MODES:
        raise ValueError(f"memcpy mode {mode!r} is unknown; use one of {sorted(MEMCPY_MODES)}")
    if mode != "per_run" and stream.cuda_stream == 0:
        raise ValueError("the batched memcpy can't run on the legacy default stream; pass another stream")
    err = load_library().kv_memcpy_runs(
        dsts.ctypes.data, srcs.ctypes.data, lens.ctypes.data, dsts.size, MEMCPY_MODES[mode], _stream_handle(stream)
    )
    _check(err, "kv_memcpy_runs")


def is_device_visible(address: int) -> bool:
    """True for device memory and for pinned or registered (mapped) host memory."""
    return bool(load_library().kv_is_device_visible(ctypes.c_void_p(address)))


def has_batch_memcpy() -> bool:
    return bool(load_library().kv_has_batch_memcpy())


def runtime_version() -> int:
    return int(load_library().kv_runtime_version())
