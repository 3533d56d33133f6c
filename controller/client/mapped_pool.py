"""The daemon's shared-memory segment mapped into the client process."""

from __future__ import annotations

import logging

import numpy as np
import torch

from controller.api import CacheError
from controller.daemon import protocol as p
from controller.segment import attach_segment
from controller.tenant_link import PinnedPrefix, receive_segment
from kvstore.host_pool import generations_view, segment_bytes
from kvstore.layout import KVLayout

log = logging.getLogger("controller.client")   # one logger for the client package (and liveness)


class MappedPool:
    """The daemon's host pool, mapped into this process (page_first, like HostPool.tensor)."""

    def __init__(self, hello: p.HelloReply, layout: KVLayout, pin: bool) -> None:
        size = hello.num_slots * hello.slot_bytes
        needed = segment_bytes(hello.num_slots, hello.slot_bytes)
        # CacheError saying why it cannot be mapped, or is too small
        if hello.fd_secret:   # a tenant's segment: handed over as a descriptor, no name
            self._shm, self._mmap = None, receive_segment(hello.fd_socket, hello.fd_secret, needed)
            buf = memoryview(self._mmap)
        else:
            self._shm, self._mmap = attach_segment(hello.segment_name, needed), None
            buf = self._shm.buf
        self.layout = layout.with_arrangement("page_first")
        if hello.slot_bytes != self.layout.page_bytes:
            self._release(buf)
            raise CacheError(f"segment {hello.segment_name} does not hold {hello.num_slots} pages of "
                             f"layout {layout.fingerprint()}")
        self._bytes = np.ndarray((size,), dtype=np.uint8, buffer=buf)
        self.generations = generations_view(buf, hello.num_slots, hello.slot_bytes)
        self.tensor = (torch.from_numpy(self._bytes).view(self.layout.torch_dtype)
                       .view(self.layout.pool_shape(hello.num_slots)))
        self.is_pinned = False
        self._prefix = None
        if pin and self._mmap is not None:   # a sparse tenant segment: pinned as it is used
            self._prefix = PinnedPrefix(self.tensor.data_ptr(), size, hello.slot_bytes)
            self.is_pinned = self._prefix.cover(0)
        elif pin:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), size, 0x01 | 0x02)
            if int(err) != 0:
                log.warning("cudaHostRegister of the daemon's segment failed (%d); copies are "
                            "not DMA (raise ulimit -l)", int(err))
            self.is_pinned = int(err) == 0

    def prepare_slots(self, slots: bytes) -> None:
        """Before a device copy names ``slots`` (a reply's uint32 blob): pin the segment up
        to them (tenant segments are pinned as they are used, ``tenant_link.PinnedPrefix``)."""
        if self._prefix is not None and not self._prefix.cover(int(np.frombuffer(slots, "<u4").max())):
            raise CacheError("cudaHostRegister of the daemon's segment failed: raise ulimit -l")

    def _release(self, buf: memoryview | None = None) -> None:
        try:
            if self._mmap is not None:
                if buf is not None:
                    buf.release()
                self._mmap.close()
            else:
                self._shm.close()
        except BufferError:
            log.warning("daemon segment still viewed by a live tensor; it is unmapped when that goes")
        self._shm = self._mmap = None

    def close(self) -> None:
        if self._shm is None and self._mmap is None:
            return
        if self._prefix is not None:
            self._prefix.close()
        elif self.is_pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        del self.tensor, self._bytes, self.generations
        self._release()
