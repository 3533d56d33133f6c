"""Mooncake Store backend (mooncake-transfer-engine-non-cuda, protocol tcp).

Keys are stored as `key_prefix + key.hex()` (Mooncake keys are strings).
The client joins the cluster in P2P-handshake mode (no HTTP metadata server)
and, by default, contributes no memory of its own (global_segment_size=0):
storage processes mount the segments.

Mooncake semantics this class hides:
  * a put of an existing key does not overwrite: puts use upsert;
  * get returns empty bytes for missing *and* failed reads: both are misses
    (a real frame is never empty, it has at least a header);
  * objects may be evicted right after being written, and are leased for a
    while after a read: delete uses force=True (a cache may drop any time);
  * calls block in C++: they run on this connector's own threads, and a call
    that outlives timeout_s is a counted miss while its thread finishes.

Reads land in buffers Mooncake allocates in the client's registered memory
(batch_get_buffer: the transfer engine writes there directly, no bytes object
is made); the base class checks and decodes each frame from there into the
caller's buffer, which is the one copy the header and checksum require.
Writes copy header and page once into a registered staging slot and upsert
from there (batch_upsert_from), the transfer engine reading it in place; the
plain upsert_batch would copy into registered memory internally as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import mmap
import queue
import threading

import numpy as np

from connectors.base import Connector, ConnectorError

log = logging.getLogger(__name__)

try:
    from mooncake.store import MooncakeDistributedStore
except ImportError as exc:   # re-raised as ConnectorError by open_connector
    raise ImportError(
        f"mooncake store client not importable ({exc}); pip install mooncake-transfer-engine-non-cuda "
        "and apt-get install libibverbs1") from exc


class MooncakeError(ConnectionError):
    """The Mooncake client reported a failure for a whole call."""


def _frame_view(handle) -> memoryview:
    """A read-only view of one object in Mooncake's client buffer.

    The ctypes array over the buffer holds the BufferHandle, and the view holds
    the array: the memory stays allocated while the view is referenced.
    """
    raw = (ctypes.c_char * handle.size()).from_address(handle.ptr())
    raw._handle = handle
    return memoryview(raw).cast("B").toreadonly()


class _Staging:
    """Registered memory cut into equal slots, one per put sub-batch in flight.

    Slots are taken and returned on the worker threads; there are as many
    slots as threads, so taking one never blocks.
    """

    def __init__(self, store, num_slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.mem = mmap.mmap(-1, num_slots * slot_bytes)
        self.array = np.frombuffer(self.mem, dtype=np.uint8)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        rc = store.register_buffer(self.addr, len(self.mem))
        if rc != 0:
            raise MooncakeError(f"register_buffer of {len(self.mem)} bytes failed: rc={rc}")
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(num_slots):
            self.free.put(i)

    def put(self, store, keys: list[str], frames) -> list[int]:
        """Copy frames into one slot and upsert them from there (a sub-batch
        larger than a slot, i.e. one huge page, goes through upsert_batch)."""
        if sum(map(len, frames)) > self.slot_bytes:
            rc = store.upsert_batch(keys, [f.tobytes() for f in frames])
            return [rc] * len(keys)
        slot = self.free.get()
        try:
            pos = slot * self.slot_bytes
            ptrs, sizes = [], []
            for f in frames:
                for part in (f.head, f.payload):   # numpy copies without the GIL
                    n = len(part)
                    self.array[pos:pos + n] = np.frombuffer(part, dtype=np.uint8)
                    pos += n
                ptrs.append(self.addr + pos - len(f))
                sizes.append(len(f))
            return store.batch_upsert_from(keys, ptrs, sizes)
        finally:
            self.free.put(slot)

    def close(self, store) -> None:
        store.unregister_buffer(self.addr)
        del self.array
        self.mem.close()


class MooncakeConnector(Connector):
    """Options: master_addr ("host:port" of mooncake_master), local_hostname
    (this client's address, 127.0.0.1 on one host), metadata_server
    ("P2PHANDSHAKE"), protocol ("tcp"), global_segment_size (bytes this client
    contributes to the store, 0 = pure client), local_buffer_size (the
    client's registered transfer buffer; must hold a batch of frames),
    key_prefix."""

    # Loopback TCP into shared memory is faster than any codec here.
    default_codec = "none"
    # Measured on loopback: two sub-batches of 32 in flight beat four of 16
    # (the client serializes much of a batch internally).
    default_max_batch_keys = 32
    default_max_batch_bytes = 128 << 20   # = one staging slot
    default_max_inflight = 2
    transient_errors = (MooncakeError, OSError)

    def __init__(self, *, master_addr: str, local_hostname: str = "127.0.0.1",
                 metadata_server: str = "P2PHANDSHAKE", protocol: str = "tcp",
                 global_segment_size: int = 0, local_buffer_size: int = 512 << 20,
                 key_prefix: bytes | str = b"kvstore:", **common) -> None:
        super().__init__(**common)
        if not isinstance(master_addr, str) or ":" not in master_addr:
            raise ConnectorError(f"master_addr must be 'host:port', got {master_addr!r}")
        if global_segment_size < 0 or local_buffer_size <= 0:
            raise ConnectorError("global_segment_size must be >= 0 and local_buffer_size > 0")
        prefix = key_prefix.decode() if isinstance(key_prefix, bytes) else key_prefix
        if not prefix.isprintable():
            raise ConnectorError("key_prefix must be printable text")
        self._prefix = prefix
        self._setup_args = (local_hostname, metadata_server, global_segment_size,
                            local_buffer_size, protocol, "", master_addr)
        self._store = None
        self._staging: _Staging | None = None
        self._setup_lock = threading.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            self._max_inflight, thread_name_prefix="l3-mooncake")

    def _k(self, keys: list[bytes]) -> list[str]:
        return [self._prefix + k.hex() for k in keys]

    async def _run(self, fn, *args):
        """Run a blocking client call on our threads (setting up first if needed)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._with_store, fn, *args)

    def _with_store(self, fn, *args):
        with self._setup_lock:
            if self._store is None:
                store = MooncakeDistributedStore()
                rc = store.setup(*self._setup_args)
                if rc != 0:
                    raise MooncakeError(f"setup with master {self._setup_args[-1]} failed: rc={rc}")
                self._staging = _Staging(store, self._max_inflight, self._max_bytes)
                self._store = store
        return fn(self._store, *args)

    # ------------------------------------------------------------ raw methods
    async def _raw_get_many(self, keys):
        handles = await self._run(lambda s, ks: s.batch_get_buffer(ks), self._k(keys))
        return [_frame_view(h) if h is not None and h.size() > 0 else None for h in handles]

    async def _raw_put_many(self, keys, frames):
        codes = await self._run(lambda s, ks, fs: self._staging.put(s, ks, fs),
                                self._k(keys), frames)
        if any(c != 0 for c in codes):
            log.warning("mooncake: upsert failed for %d of %d values: %s", sum(c != 0 for c in codes),
                        len(codes), sorted(set(codes))[:3])
        return [c == 0 for c in codes]

    async def _raw_exists_many(self, keys):
        codes = await self._run(lambda s, ks: s.batch_is_exist(ks), self._k(keys))
        if codes and all(c < 0 for c in codes):
            raise MooncakeError(f"batch_is_exist failed: {codes[0]}")
        return [c == 1 for c in codes]

    async def _raw_delete_many(self, keys):
        codes = await self._run(lambda s, ks: s.batch_remove(ks, True), self._k(keys))
        return sum(1 for c in codes if c == 0)

    async def _on_corrupt(self, keys):
        await self._raw_delete_many(keys)

    async def _close(self):
        # the client's close takes ~1 s (it joins its threads): off the loop
        await asyncio.get_running_loop().run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        self._threads.shutdown(wait=True)
        if self._store is not None:
            if self._staging is not None:
                self._staging.close(self._store)
            self._store.close()
            self._store = None
