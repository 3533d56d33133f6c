"""HostPool: fixed-size page slots in one POSIX shared-memory segment (the L2 tier's memory).

Each slot holds one whole page (every layer, K and V) in ``page_first`` order,
so a slot is one contiguous run of ``layout.page_bytes``: that is what the L3
stores read and write, and what another process maps by the segment's name.

Slot life cycle (the pool only does mechanism; the tier index decides what to evict)::

    FREE --try_reserve--> RESERVED --mark_ready--> READY --free--> FREE
                               \\------------free (abort)-------------/

A slot with a lease (``lease_count > 0``) can't be freed, so it is never reused
while a reader holds it.

Generations (the fence readers and writers in other processes check): after the
slots the segment holds one uint32 per slot, bumped each time the slot is handed
to a writer (``try_reserve``). Whoever learned a slot's generation when it was
leased or reserved to them can tell, after copying, whether the slot changed
owner meanwhile (``kvstore.slot_fence``)::

    segment:  [slot 0][slot 1] ... [slot n-1][pad to 64][gen 0][gen 1] ... [gen n-1]
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import sys
import uuid
from multiprocessing import shared_memory
from typing import Iterable, Sequence

import numpy as np
import torch

from kvstore.host_memory import check_pool_fits
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

FREE, RESERVED, READY = 0, 1, 2
_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 0x01, 0x02  # cudaHostRegister flags
_STATE_NAMES = {FREE: "free", RESERVED: "reserved", READY: "ready"}


def generations_offset(num_slots: int, slot_bytes: int) -> int:
    """Byte offset of the generation array in a pool segment (64-byte aligned)."""
    return -(-num_slots * slot_bytes // 64) * 64


def segment_bytes(num_slots: int, slot_bytes: int) -> int:
    """Size of a pool segment: the slots, then one uint32 generation per slot."""
    return generations_offset(num_slots, slot_bytes) + 4 * num_slots


def generations_view(buf, num_slots: int, slot_bytes: int) -> np.ndarray:
    """The generation array of a mapped pool segment (shared, not a copy)."""
    return np.ndarray((num_slots,), dtype=np.uint32, buffer=buf,
                      offset=generations_offset(num_slots, slot_bytes))


def _slot_array(slots: Iterable[int] | np.ndarray) -> np.ndarray:
    """Slot numbers as one index array (converted once per call)."""
    if isinstance(slots, np.ndarray):
        return slots.astype(np.intp, copy=False)
    return np.fromiter(slots, dtype=np.intp) if not isinstance(slots, Sequence) \
        else np.asarray(slots, dtype=np.intp)


class HostPoolError(RuntimeError):
    """A slot operation broke the pool's rules (e.g. freeing a leased slot)."""


def unique_shm_name(prefix: str = "kvstore") -> str:
    """A segment name no other pool on this host uses (two daemons never collide)."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _close_mapping(shm: shared_memory.SharedMemory) -> None:
    """Unmap a segment. Views that only reference cycles still hold (the frames of
    finished L3 coroutines) are collected first; if a live view remains, the
    mapping stays until it goes, without an error at interpreter exit."""
    try:
        shm.close()
        return
    except BufferError:
        gc.collect()
    try:
        shm.close()
    except BufferError:
        log.warning("host pool %s closed while views of it were alive", shm.name)
        _views_alive.append(shm)   # SharedMemory.__del__ would raise BufferError again


_views_alive: list[shared_memory.SharedMemory] = []


class HostPool:
    """Page slots in shared memory, pinned for DMA when CUDA is present."""

    def __init__(
        self,
        layout: KVLayout,
        num_slots: int,
        name: str | None = None,
        pin: bool | None = None,
        prefault: bool = False,
        memfd: bool = False,
    ) -> None:
        """``memfd``: back the segment with an anonymous memory file (``os.memfd_create``)
        instead of a /dev/shm name: no other process can open it by name; the daemon hands
        it to a tenant's clients as a file descriptor (``fileno``), and freed slots give
        their memory back (``release_memory``), so a large sparse pool costs only what it
        holds."""
        if num_slots <= 0:
            raise ValueError(f"HostPool needs num_slots > 0, got {num_slots}")
        self.layout = layout.with_arrangement("page_first")
        self.num_slots = num_slots
        self.slot_bytes = self.layout.page_bytes
        self._create_segment(name, memfd)
        self.is_memfd = memfd
        self.returns_memory = memfd
        """Freed slots give their memory back (``release_memory``). Turned off for good once
        a client pins the segment (cudaHostRegister): a punched-out page it had pinned
        would stay its own, so its device copies and everyone's mappings would diverge."""
        self.high_water = 0
        """1 + the highest slot ever reserved: a pool that keeps freed slots' memory
        (``returns_memory`` off) holds at most this many slots' bytes."""
        self._map_arrays()
        if prefault:
            # One write per OS page makes the kernel hand every page over now (shm pages
            # are allocated on first touch); the segment is all zeros either way.
            self._bytes[:: mmap.PAGESIZE] = 0
        self._states = np.zeros(num_slots, dtype=np.uint8)
        self._leases = np.zeros(num_slots, dtype=np.int32)
        # Stack of free slots; low slots are handed out first (reversed order).
        self._free_stack: list[int] = list(range(num_slots - 1, -1, -1))
        self.is_pinned = False
        if pin if pin is not None else torch.cuda.is_available():
            self._pin()

    def _create_segment(self, name: str | None, memfd: bool) -> None:
        """Create the shared segment (a memfd or a /dev/shm name); sets ``name``, ``_buf``."""
        size = segment_bytes(self.num_slots, self.slot_bytes)
        self._shm = self._mmap = None
        self._fd = -1
        if memfd:
            # The caller (the daemon's pool registry) bounds what all its sparse pools hold.
            self._fd = os.memfd_create(name or unique_shm_name(), os.MFD_CLOEXEC)
            try:
                os.ftruncate(self._fd, size)
                self._mmap = mmap.mmap(self._fd, size)
            except BaseException:
                os.close(self._fd)
                raise
            self.name = f"memfd:{name or 'pool'}"
            self._buf = memoryview(self._mmap)
        else:
            check_pool_fits(self.num_slots, self.slot_bytes)  # the segment is sparse: fail now, not at OOM
            self._shm = shared_memory.SharedMemory(name=name or unique_shm_name(), create=True, size=size)
            self.name = self._shm.name
            self._buf = self._shm.buf

    def _map_arrays(self) -> None:
        """The byte, generation and tensor views over the segment."""
        self._bytes = np.ndarray((self.num_slots * self.slot_bytes,), dtype=np.uint8, buffer=self._buf)
        self.generations = generations_view(self._buf, self.num_slots, self.slot_bytes)
        """Per-slot generation, bumped when a slot is reserved (module doc); in the segment."""
        self.tensor = (
            torch.from_numpy(self._bytes)
            .view(self.layout.torch_dtype)
            .view(self.layout.pool_shape(self.num_slots))
        )

    # ---- memory -------------------------------------------------------------
    def _pin(self) -> None:
        """Page-lock the segment so device copies run as DMA (cudaHostRegister)."""
        cudart = torch.cuda.cudart()
        size = self.num_slots * self.slot_bytes
        # Portable: pinned for every device of the process, not only the current one.
        # Mapped: device-addressable, so SM copy kernels can read and write it (UVA).
        flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
        err = cudart.cudaHostRegister(self.tensor.data_ptr(), size, flags)
        if int(err) != 0:
            raise HostPoolError(
                f"cudaHostRegister of {size} bytes failed with error {int(err)}; "
                "lower the host pool size or raise the memlock limit (ulimit -l)"
            )
        self.is_pinned = True

    def slot_view(self, slot: int) -> memoryview:
        """Writable bytes of one slot (what L3 stores read into and write from)."""
        start = slot * self.slot_bytes
        return self._buf[start : start + self.slot_bytes]

    def fileno(self) -> int:
        """The memfd of a ``memfd`` pool (what its clients map); -1 for a /dev/shm one."""
        return self._fd

    def release_memory(self, slots: Sequence[int]) -> None:
        """Give the memory of free slots back to the system (memfd pools; a no-op for
        others): the whole OS pages inside each slot are punched out (MADV_REMOVE) and
        read as zeros if the slot is used again. Pages a slot shares with a neighbour
        at its edges stay (slots need not be page-aligned)."""
        if self._mmap is None:
            return
        page = mmap.PAGESIZE
        for slot in slots:
            start = -(-slot * self.slot_bytes // page) * page
            end = (slot + 1) * self.slot_bytes // page * page
            if end > start:
                self._mmap.madvise(mmap.MADV_REMOVE, start, end - start)

    # ---- slot states --------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free_stack)

    @property
    def num_reserved(self) -> int:
        """Slots being written (reserved, not yet ready)."""
        return int(np.count_nonzero(self._states == RESERVED))

    def state(self, slot: int) -> str:
        return _STATE_NAMES[int(self._states[slot])]

    def try_reserve(self, n: int) -> list[int] | None:
        """Take ``n`` free slots for writing, or None (and change nothing) if fewer are free."""
        if n > len(self._free_stack):
            return None
        stack = self._free_stack
        slots = stack[len(stack) - n:][::-1]   # the order n pops take them in, without the loop
        del stack[len(stack) - n:]
        if slots:
            self.high_water = max(self.high_water, max(slots) + 1)
        self._states[slots] = RESERVED
        # Before anyone can learn these slot numbers: a reader or writer that held one
        # earlier sees the change once its copy is over (kvstore.slot_fence).
        self.generations[slots] += 1
        return slots

    def mark_ready(self, slots: Sequence[int]) -> None:
        """A reserved slot's bytes are complete: readers may use it from now on."""
        self._require_state(slots, RESERVED, "mark_ready")
        self._states[list(slots)] = READY

    def free(self, slots: Sequence[int]) -> None:
        """Return slots to the free list. Raises if any is free already or leased."""
        slots = list(slots)
        if not slots:
            return
        idx = np.asarray(slots)
        if (self._states[idx] == FREE).any():
            raise HostPoolError(f"free() of a slot that is already free: {slots}")
        if (self._leases[idx] > 0).any():
            leased = [s for s in slots if self._leases[s] > 0]
            raise HostPoolError(f"free() of leased slots {leased}: release their leases first")
        if len(set(slots)) != len(slots):
            raise HostPoolError(f"free() got a slot twice: {slots}")
        self._states[idx] = FREE
        self._free_stack.extend(slots)
        if self.returns_memory:   # a sparse pool holds only what is in use
            self.release_memory(slots)

    def lease(self, slots: Iterable[int]) -> None:
        """Pin ready slots for a reader; they can't be freed until unleased."""
        idx = _slot_array(slots)
        self._require_state(idx, READY, "lease")
        # Repeated slots count once each (nested leases): np.add.at, with a typed one so
        # numpy stays on its fast path.
        np.add.at(self._leases, idx, np.int32(1))

    def unlease(self, slots: Iterable[int]) -> None:
        idx = _slot_array(slots)
        if len(idx) and (self._leases[idx] <= 0).any():
            raise HostPoolError(f"unlease() of slots without a lease: {idx.tolist()}")
        np.subtract.at(self._leases, idx, np.int32(1))

    def lease_count(self, slot: int) -> int:
        return int(self._leases[slot])

    def _require_state(self, slots: Sequence[int] | np.ndarray, state: int, op: str) -> None:
        idx = _slot_array(slots)
        if len(idx) and (self._states[idx] != state).any():
            found = {int(s): self.state(s) for s in idx if self._states[s] != state}
            raise HostPoolError(f"{op}() needs {_STATE_NAMES[state]} slots, found {found}")

    def check_integrity(self) -> None:
        """Raise HostPoolError if the free list and the slot states disagree."""
        free_set = set(self._free_stack)
        if len(free_set) != len(self._free_stack):
            raise HostPoolError("free list holds a slot twice")
        marked_free = set(np.flatnonzero(self._states == FREE).tolist())
        if free_set != marked_free:
            raise HostPoolError(
                f"free list {sorted(free_set)[:8]}... disagrees with states {sorted(marked_free)[:8]}..."
            )
        if (self._leases < 0).any() or (self._leases[self._states != READY] != 0).any():
            raise HostPoolError("a lease is held on a slot that is not ready")

    # ---- life cycle ---------------------------------------------------------
    def close(self) -> None:
        """Unpin, unmap and remove the segment. Idempotent."""
        shm = getattr(self, "_shm", None)
        if shm is None and getattr(self, "_mmap", None) is None:
            return
        if self.is_pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.is_pinned = False
        npu_ops = sys.modules.get("npu_ops")  # registered on first NPU copy, if one ran
        if npu_ops is not None and npu_ops.is_registered(self.tensor.data_ptr()):
            npu_ops.unregister_host_memory(self.tensor.data_ptr())
        del self.tensor, self._bytes, self.generations
        self._shm = None
        if self._mmap is not None:
            self._close_memfd()
            return
        try:
            _close_mapping(shm)
        finally:
            shm.unlink()

    def _close_memfd(self) -> None:
        mm, self._mmap = self._mmap, None
        try:
            self._buf.release()
            mm.close()
        except BufferError:
            gc.collect()
            try:
                mm.close()
            except BufferError:
                log.warning("host pool %s closed while views of it were alive", self.name)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser at interpreter exit
            pass
