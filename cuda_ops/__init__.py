"""CUDA byte movers for paged KV: a bounded-grid gather/scatter kernel (SM path) and
batched copy-engine transfers (DMA path). Depends on torch only; knows nothing of
kvstore. Importing this package builds nothing: the library is compiled with nvcc on
first use and cached (see ``cuda_ops.build``)."""

from cuda_ops.ops import (
    CudaOpsError,
    ChunkSpace,
    copy_chunks,
    has_batch_memcpy,
    is_device_visible,
    memcpy_runs,
    runtime_version,
)

__all__ = [
    "CudaOpsError",
    "ChunkSpace",
    "copy_chunks",
    "has_batch_memcpy",
    "is_device_visible",
    "memcpy_runs",
    "runtime_version",
]
