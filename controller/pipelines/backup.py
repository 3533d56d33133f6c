"""Backup: L2 -> L3 writes through one background queue, off every caller's path.

Two kinds of item, both written by one worker on the L3 loop::

    resident  a page still in L2 (write_through at commit, write_through_selective
              after N hits, flush at close): the worker leases it, puts it straight
              from its slot, releases it -- a lease keeps the slot from reuse mid-put
    evicted   a page L2 dropped before its write ran (write_back): its bytes were
              copied out at eviction, so the slot could be reused at once; the copies
              are bounded by ``backup_queue_bytes`` and a page that does not fit is
              dropped and counted -- never half-written

Prefetch goes first on the L3 link: the worker waits (a little) while prefetch
reads are in flight. Queue depth, staged bytes, lag and drops are in the stats.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Callable, Protocol

from kvstore.index.host_store import HostStore
from kvstore.page_keys import PageKey

log = logging.getLogger(__name__)

_BATCH_PAGES = 32
_PREFETCH_FIRST_S = 0.05   # longest a backup batch yields to prefetch reads


class BackupHost(Protocol):
    """What the backup worker needs of the cache core."""

    host: HostStore
    lock: threading.RLock

    def on_backup_result(self, keys: list[PageKey], stored: list[bool], evicted: bool) -> None: ...

    def count_l3_error(self) -> None: ...

    def observe_l3_write(self, nbytes: int, seconds: float) -> None:
        """A put of ``nbytes`` (every page stored) took ``seconds``."""


class BackupQueue:
    def __init__(self, core: BackupHost, l3, loop: asyncio.AbstractEventLoop, max_bytes: int,
                 prefetch_idle: Callable[[], asyncio.Event]) -> None:
        self._core = core
        self._l3 = l3
        self._loop = loop
        self._max_bytes = max_bytes
        self._prefetch_idle = prefetch_idle
        # (key, bytes or None for a resident page, time queued, position in its chain);
        # appended under the core lock
        self._items: deque[tuple[PageKey, bytes | None, float, int]] = deque()
        self._queued: set[PageKey] = set()
        # evicted pages not yet written, by key: a prefetch takes them from here, since
        # L3 does not have them yet (a victim buffer)
        self._staged: dict[PageKey, bytes] = {}
        self.staged_bytes = 0
        self.num_dropped = 0
        self._num_busy = 0
        self._is_stopping = False
        self._wake: asyncio.Event | None = None
        self._drained = threading.Condition()
        self._task = asyncio.run_coroutine_threadsafe(self._worker(), loop)

    # ---- producers (any thread, under the core lock) --------------------------------
    def add_resident(self, keys: list[PageKey], depths: list[int]) -> None:
        """Queue pages still in L2; ``depths[i]``: position of ``keys[i]`` in its chain."""
        now = time.monotonic()
        for key, depth in zip(keys, depths):
            if key not in self._queued:
                self._queued.add(key)
                self._items.append((key, None, now, depth))
        self._poke()

    def add_evicted(self, keys: list[PageKey], pages: list[memoryview], depths: list[int]) -> int:
        """Copy evicted pages out for writing; returns how many did not fit (dropped)."""
        now, dropped = time.monotonic(), 0
        for key, page, depth in zip(keys, pages, depths):
            if self.staged_bytes + len(page) > self._max_bytes:
                dropped += 1
                continue
            data = bytes(page)
            self._items.append((key, data, now, depth))
            self._staged[key] = data
            self.staged_bytes += len(page)
        self.num_dropped += dropped
        self._poke()
        return dropped

    def _poke(self) -> None:
        self._loop.call_soon_threadsafe(self._wake_worker)

    def _wake_worker(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def sort_by_depth(self) -> None:
        """Put what is queued in chain order, parents before children over all chains
        (stable: arrival order within a depth), so that writes cut short by a deadline
        leave each chain's written pages a prefix. Call under the core lock."""
        self._items = deque(sorted(self._items, key=lambda item: item[3]))

    def staged_page(self, key: PageKey) -> bytes | None:
        """The bytes of an evicted page still waiting for its write (under the core lock)."""
        return self._staged.get(key)

    # ---- state --------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Pages queued or being written."""
        return len(self._items) + self._num_busy

    @property
    def num_staged_pages(self) -> int:
        """Evicted pages whose copy waits for its write."""
        return len(self._staged)

    @property
    def lag_s(self) -> float:
        """Age of the oldest queued page (0 when empty)."""
        items = self._items
        return time.monotonic() - items[0][2] if items else 0.0

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued page was written or failed; False on timeout."""
        end = time.monotonic() + timeout_s
        with self._drained:
            while self.num_pages:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._drained.wait(min(left, 0.05))
        return True

    def close(self, grace_s: float = 0.0) -> int:
        """Stop the worker; returns the evicted pages whose copies were never written
        (lost: L2 no longer holds them). It takes no new
        batch; the batch being written may finish for up to ``grace_s`` (a batch cut
        mid-write could keep a child whose parent's write was stopped), then it is
        cancelled."""
        self._is_stopping = True
        self._poke()
        try:
            self._task.result(timeout=grace_s)
        except BaseException:  # noqa: BLE001 - not done in time (or failed): cancel it
            self._task.cancel()
            try:
                self._task.result(timeout=10)
            except BaseException:  # noqa: BLE001 - cancelled is the normal end
                pass
        lost = len(self._staged)
        self._items.clear()
        self._queued.clear()
        self._staged.clear()
        self.staged_bytes = 0
        return lost

    # ---- the worker (on the L3 loop) --------------------------------------------------
    async def _worker(self) -> None:
        self._wake = asyncio.Event()
        while not self._is_stopping:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
                continue
            idle = self._prefetch_idle()
            if not idle.is_set():
                try:
                    await asyncio.wait_for(idle.wait(), _PREFETCH_FIRST_S)
                except asyncio.TimeoutError:
                    pass
            await self._write_batch()
            with self._drained:
                self._drained.notify_all()

    async def _write_batch(self) -> None:
        """Write the next batch in queue order, as one put (so the flush's parents-first
        order holds within a batch too)."""
        with self._core.lock:
            batch = [self._items.popleft() for _ in range(min(_BATCH_PAGES, len(self._items)))]
            self._num_busy = len(batch)
            self._queued.difference_update(key for key, data, _, _ in batch if data is None)
            index = self._core.host.index
            # a resident page evicted meanwhile was queued again with its bytes (add_evicted)
            batch = [item for item in batch if item[1] is not None or item[0] in index]
            resident = [key for key, data, _, _ in batch if data is None]
            slots = iter(self._core.host.lease(resident))
            values = [data if data is not None else self._core.host.pool.slot_view(next(slots))
                      for _, data, _, _ in batch]
        evicted = [(key, data) for key, data, _, _ in batch if data is not None]
        try:
            if batch:
                await self._put([key for key, *_ in batch], values,
                                [data is not None for _, data, _, _ in batch])
        finally:
            del values
            with self._core.lock:
                self._core.host.release(resident)
                self.staged_bytes -= sum(len(d) for _, d in evicted)
                for key, data in evicted:
                    if self._staged.get(key) is data:
                        del self._staged[key]
                self._num_busy = 0

    async def _put(self, keys: list[PageKey], values: list, is_evicted: list[bool]) -> None:
        try:
            started = time.perf_counter()
            stored = await self._l3.put(keys, values)
            if all(stored):   # the link's rate before any read measures it (cost model prior)
                self._core.observe_l3_write(len(keys) * self._core.host.pool.slot_bytes,
                                            time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - a lost backup is a counted drop, not a crash
            self._core.count_l3_error()
            log.warning("L3 put() of %d pages failed: %s", len(keys), exc)
            stored = [False] * len(keys)
        finally:
            del values
        with self._core.lock:
            for evicted in (False, True):
                part = [i for i, e in enumerate(is_evicted) if e is evicted]
                if part:
                    self._core.on_backup_result([keys[i] for i in part], [stored[i] for i in part],
                                                evicted)
