"""Ascend NPU byte movers through torch_npu. Depends on torch only at import time:
torch_npu and the CANN runtime (libascendcl) are imported / loaded on first use.

NOT YET RUN ON ASCEND HARDWARE. Written against the documented APIs of
torch_npu 2.x (``torch.npu.Stream``, ``torch.npu.stream``, ``torch.npu.Event``,
``Tensor.copy_(..., non_blocking=True)``) and of the CANN runtime (>= 8.5)
``aclrtHostRegisterV2`` / ``aclrtHostUnregister``.

- ``move_runs`` copies byte runs between two flat uint8 tensors with non-blocking
  copies on the current stream; it is device-agnostic, so the CPU tests run it.
- ``register_host_memory`` page-locks an existing host range (the counterpart of
  cudaHostRegister) so the runs move by DMA, asynchronously.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import torch

ACL_HOST_REG_MAPPED = 0x2
ACL_HOST_REG_PINNED = 0x10000000
_lock = threading.Lock()
_acl: ctypes.CDLL | None = None
_registered: dict[int, int] = {}


class NpuOpsError(RuntimeError):
    """torch_npu or the CANN runtime is missing, or one of its calls failed."""


def is_available() -> bool:
    """True when torch_npu imports and sees at least one NPU."""
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return bool(torch.npu.is_available())


def move_runs(src: torch.Tensor, dst: torch.Tensor, src_offsets, dst_offsets, sizes) -> None:
    """``dst[d:d+n] = src[s:s+n]`` for each run, as non-blocking copies enqueued on the
    current stream of the device side. ``src``/``dst`` are 1-D uint8 tensors; offsets and
    sizes are integer sequences (numpy arrays) of one length; bounds are the caller's to check."""
    for s, d, n in zip(src_offsets.tolist(), dst_offsets.tolist(), sizes.tolist()):
        dst.narrow(0, d, n).copy_(src.narrow(0, s, n), non_blocking=True)


def _acl_lib() -> ctypes.CDLL:
    global _acl
    if _acl is None:
        name = ctypes.util.find_library("ascendcl") or "libascendcl.so"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise NpuOpsError(
                f"cannot load the CANN runtime ({name}): source set_env.sh of the CANN toolkit"
            ) from exc
        lib.aclrtHostRegisterV2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32]
        lib.aclrtHostRegisterV2.restype = ctypes.c_int
        lib.aclrtHostUnregister.argtypes = [ctypes.c_void_p]
        lib.aclrtHostUnregister.restype = ctypes.c_int
        _acl = lib
    return _acl


def register_host_memory(address: int, size: int) -> None:
    """Page-lock ``size`` bytes of host memory at ``address`` (4 KiB aligned) for NPU DMA.
    Idempotent per address (a larger range at the same address is registered anew);
    raises NpuOpsError with the runtime's error code."""
    if address % 4096:
        raise NpuOpsError(f"host range at {address:#x} is not 4 KiB aligned; aclrtHostRegisterV2 needs it")
    with _lock:
        if _registered.get(address, -1) >= size:
            return
        if address in _registered:  # a smaller range at the same address (a stale mapping)
            _acl_lib().aclrtHostUnregister(ctypes.c_void_p(address))
            del _registered[address]
        err = _acl_lib().aclrtHostRegisterV2(ctypes.c_void_p(address), size, ACL_HOST_REG_PINNED)
        if err != 0:
            raise NpuOpsError(f"aclrtHostRegisterV2 of {size} bytes failed with aclError {err}")
        _registered[address] = size


def unregister_host_memory(address: int) -> None:
    with _lock:
        if _registered.pop(address, None) is None:
            return
        err = _acl_lib().aclrtHostUnregister(ctypes.c_void_p(address))
        if err != 0:
            raise NpuOpsError(f"aclrtHostUnregister failed with aclError {err}")


def is_registered(address: int) -> bool:
    return address in _registered
