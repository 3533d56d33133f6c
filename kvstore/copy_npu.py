"""Ascend NPU copy backend: the contract of kvstore.copy_ops through torch_npu.

NOT YET RUN ON ASCEND HARDWARE (see README). The plan and the run coalescing are
``copy_runs`` (tested on CPU through ``RunCopyBackend``); the moves are
``npu_ops.move_runs``: one non-blocking ``copy_`` per coalesced run on the caller's
NPU stream. The host side is page-locked once per buffer with the CANN runtime
(``aclrtHostRegisterV2``, the counterpart of cudaHostRegister) unless torch_npu
already pinned it, so the copies can run as asynchronous DMA (whether torch_npu's
``copy_(non_blocking=True)`` treats ACL-registered memory as pinned, and whether
``aclrtHostRegisterV2`` accepts a shared-memory mapping, is to be checked on
hardware). ``HostPool.close`` unregisters the segment. The controller loads NPU
pools layer by layer on the engine's stream as each layer is waited on; a side
stream with an event per layer, as on CUDA, is not written yet.
"""

from __future__ import annotations

from typing import Any

import torch

import npu_ops
from kvstore.copy_ops import CopyArgumentError
from kvstore.copy_runs import CopyRuns, RunCopyBackend, flat_bytes


class NpuCopyBackend(RunCopyBackend):
    """Pages between an NPU pool and a (registered) host pool, as coalesced DMA runs."""

    name = "npu"

    def __init__(self) -> None:
        if not npu_ops.is_available():
            raise npu_ops.NpuOpsError("the npu copy backend needs torch_npu and an Ascend NPU")

    def _move_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: CopyRuns, stream: Any) -> None:
        # Planning (copy_pages and plan_layers alike) is RunCopyBackend's; this is the executor.
        npu = [t.device for t in (src, dst) if t.device.type == "npu"]
        if not npu:
            raise CopyArgumentError("the npu copy backend needs at least one pool on an NPU")
        for t in (src, dst):
            if t.device.type == "cpu":
                self._ensure_registered(t)
        stream = stream if stream is not None else torch.npu.current_stream(npu[0])
        with torch.npu.stream(stream):
            npu_ops.move_runs(flat_bytes(src), flat_bytes(dst), runs.src_offsets, runs.dst_offsets, runs.sizes)

    @staticmethod
    def _ensure_registered(host: torch.Tensor) -> None:
        if host.is_pinned():
            return
        storage = host.untyped_storage()
        npu_ops.register_host_memory(storage.data_ptr(), storage.nbytes())
