"""The daemon's shared-memory segment mapped into the client process."""

from __future__ import annotations

import logging

import numpy as np
import torch

from controller.api import CacheError
from controller.daemon import protocol as p
from controller.segment import attach_segment
from kvstore.host_pool import generations_view, segment_bytes
from kvstore.layout import KVLayout

log = logging.getLogger("controller.client")   # one logger for the client package (and liveness)


class MappedPool:
    """The daemon's host pool, mapped into this process (page_first, like HostPool.tensor)."""

    def __init__(self, hello: p.HelloReply, layout: KVLayout, pin: bool) -> None:
        size = hello.num_slots * hello.slot_bytes
        # CacheError saying why it cannot be mapped, or is too small
        self._shm = attach_segment(hello.segment_name, segment_bytes(hello.num_slots, hello.slot_bytes))
        self.layout = layout.with_arrangement("page_first")
        if hello.slot_bytes != self.layout.page_bytes:
            self._shm.close()
            raise CacheError(f"segment {hello.segment_name} does not hold {hello.num_slots} pages of "
                             f"layout {layout.fingerprint()}")
        self._bytes = np.ndarray((size,), dtype=np.uint8, buffer=self._shm.buf)
        self.generations = generations_view(self._shm.buf, hello.num_slots, hello.slot_bytes)
        self.tensor = (torch.from_numpy(self._bytes).view(self.layout.torch_dtype)
                       .view(self.layout.pool_shape(hello.num_slots)))
        self.is_pinned = False
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), size, 0x01 | 0x02)
            if int(err) != 0:
                log.warning("cudaHostRegister of the daemon's segment failed (%d); copies are "
                            "not DMA (raise ulimit -l)", int(err))
            self.is_pinned = int(err) == 0

    def close(self) -> None:
        if self._shm is None:
            return
        if self.is_pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        del self.tensor, self._bytes, self.generations
        try:
            self._shm.close()
        except BufferError:
            log.warning("daemon segment still viewed by a live tensor; it is unmapped when that goes")
        self._shm = None
