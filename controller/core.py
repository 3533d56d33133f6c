"""CacheCore: the device-free half of the cache -- L2 (a host store in shm), the L3
connector and the write policy between them.

The embedded controller drives one core from the engine's thread; the daemon
drives one from its request loop. Either way one thread calls it (it is not
thread-safe), and it never touches a device: the caller moves bytes between
its device pool and the slots the core names.

Data paths::

    lookup:  L2 match, then L3 exists + get_into free L2 slots (pages come back up)
    store:   begin_store reserves slots -> the caller writes them -> commit_store publishes
             (--put--> L3 at once under write_through)
    evict:   L2 slot --put--> L3 if the page is due (not yet in L3) --> slot freed
    close:   every due page --put--> L3 within a deadline, then L3 closes, shm goes

A page is *due* while L2 holds it and L3 is not known to: from its commit until
a put succeeds (write_through puts at once; write_back at eviction or close).
Pages read from L3 are never due.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from controller.api import CacheError, CacheStats
from controller.async_runner import AsyncRunner
from controller.config import ControllerConfig
from kvstore.host_pool import HostPool
from kvstore.host_store import HostStore
from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey

log = logging.getLogger(__name__)

_FLUSH_BATCH = 64   # pages per put while flushing: a bounded call, so the deadline holds


@dataclass(frozen=True)
class StorePlan:
    """Slots reserved by ``begin_store`` for the absent pages of one chain.

    ``slots[i]`` is to receive page ``keys[positions[i]]``; nothing is visible to
    anyone until ``commit_store``. ``num_skipped`` absent pages got no slot (the
    pool is full of leased or reserved pages).
    """

    positions: tuple[int, ...]
    slots: tuple[int, ...]
    num_skipped: int


@dataclass(frozen=True)
class FlushReport:
    """What a flush wrote down to L3: ``num_failed`` due pages were not written
    (L3 refused them, failed, or the deadline came first)."""

    num_written: int = 0
    num_failed: int = 0


class CacheCore:
    """L2 + L3 + write policy; see the module docstring."""

    def __init__(self, config: ControllerConfig, layout: KVLayout) -> None:
        self.config = config
        self.layout = layout
        self._stats = CacheStats()
        self._due: set[PageKey] = set()
        self._runner: AsyncRunner | None = None
        self._l3 = None
        self._is_closed = False
        pool = HostPool(layout, config.host_pool_pages)
        self.host = HostStore(pool, policy=config.eviction_policy, on_evict=self._on_evict)
        if config.l3.connector is not None:
            try:
                self._open_l3()
            except BaseException:
                pool.close()
                raise

    @property
    def pool(self) -> HostPool:
        return self.host.pool

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def _open_l3(self) -> None:
        from connectors import open_connector

        self._runner = AsyncRunner()
        options = dict(self.config.l3.options)
        options.setdefault("fingerprint", self.layout.fingerprint())

        async def open_on_loop():
            # A connector belongs to the loop it is created on; create it on the runner's.
            return open_connector(self.config.l3.connector, **options)

        try:
            self._l3 = self._l3_call(open_on_loop())
        except BaseException:
            self._runner.close()
            raise

    def _l3_call(self, coro, timeout_s: float | None = None):
        return self._runner.run(coro, timeout_s or self.config.l3.timeout_s)

    def check_open(self) -> None:
        if self._is_closed:
            raise CacheError("this cache client is closed; connect() again to use the cache")

    # ---- lookup -----------------------------------------------------------------
    def lookup(self, keys: Sequence[PageKey]) -> tuple[int, int]:
        """Lease the longest cached prefix of a chain; returns (num_l2, num_l3).

        ``keys[:num_l2 + num_l3]`` hold one new lease each. Pages found only in L3
        were read into free L2 slots (which may evict unleased L2 pages)."""
        self.check_open()
        in_l2 = [slot is not None for slot in self.host.index.get_many(keys)]
        # Lease every L2 page of the chain first, so filling a gap from L3 can't
        # evict a later page of the same chain.
        held = [k for k, present in zip(keys, in_l2) if present]
        self.host.lease(held)
        num_hit, num_l3 = 0, 0
        try:
            while num_hit < len(keys):
                if in_l2[num_hit]:
                    num_hit += 1
                    continue
                gap_end = next((j for j in range(num_hit, len(keys)) if in_l2[j]), len(keys))
                fetched = self._fetch_from_l3(keys, num_hit, gap_end) if self._l3 is not None else 0
                num_hit += fetched
                num_l3 += fetched
                if num_hit < gap_end:
                    break
        except BaseException:
            fetched = [k for k, present in zip(keys[:num_hit], in_l2) if not present]
            self.host.release(held + fetched)
            raise
        self.host.release([k for k, present in zip(keys[num_hit:], in_l2[num_hit:]) if present])
        self.host.touch(keys[:num_hit])
        stats = self._stats
        stats.num_lookups += 1
        stats.num_lookup_pages += len(keys)
        stats.num_l2_hit_pages += num_hit - num_l3
        stats.num_l3_hit_pages += num_l3
        return num_hit - num_l3, num_l3

    def _fetch_from_l3(self, keys: Sequence[PageKey], start: int, end: int) -> int:
        """Bring ``keys[start:end]`` (absent from L2) from L3 into L2, leased.

        Returns how many consecutive pages arrived; stops at the first miss, since
        a page after a gap is of no use to a prefix."""
        try:
            num_present = self._l3_call(self._l3.exists(keys[start:end]))
        except Exception as exc:  # noqa: BLE001 - an L3 outage is a miss, not an engine failure
            self._stats.num_l3_errors += 1
            log.warning("L3 exists() failed, treating as miss: %s", exc)
            return 0
        slots = self._reserve_up_to(num_present)
        if not slots:
            return 0
        wanted = list(keys[start : start + len(slots)])
        buffers = [self.pool.slot_view(s) for s in slots]
        try:
            found = self._l3_call(self._l3.get_into(wanted, buffers))
        except Exception as exc:  # noqa: BLE001
            self._stats.num_l3_errors += 1
            log.warning("L3 get_into() failed, treating as miss: %s", exc)
            found = [False] * len(wanted)
        del buffers
        num_ok = next((i for i, ok in enumerate(found) if not ok), len(found))
        self.host.abort(slots[num_ok:])
        parents = [keys[i - 1] if i else None for i in range(start, start + num_ok)]
        self.host.commit(wanted[:num_ok], slots[:num_ok], parents)
        self.host.lease(wanted[:num_ok])
        return num_ok

    def _reserve_up_to(self, n: int) -> list[int]:
        """As many slots as possible up to ``n`` (leased pages can't be evicted for them)."""
        while n > 0:
            slots = self.host.reserve(n)
            if slots is not None:
                return slots
            n //= 2
        return []

    def slots_of(self, keys: Sequence[PageKey]) -> list[int]:
        """Slots of present pages (leased ones stay put); raises KeyError for an absent one."""
        return self.host.slots_of(keys)

    def release(self, keys: Sequence[PageKey]) -> None:
        """End one lease on each key (all or nothing)."""
        self.host.release(keys)

    # ---- store ------------------------------------------------------------------
    def begin_store(self, keys: Sequence[PageKey]) -> StorePlan:
        """Reserve slots for the pages of a chain that L2 lacks; present ones count as hits."""
        self.check_open()
        index = self.host.index
        present = index.get_many(keys)
        absent = [i for i, slot in enumerate(present) if slot is None]
        self.host.touch([k for k, slot in zip(keys, present) if slot is not None])
        slots = self._reserve_up_to(len(absent)) if absent else []
        return StorePlan(tuple(absent[: len(slots)]), tuple(slots), len(absent) - len(slots))

    def commit_store(self, keys: Sequence[PageKey], plan: StorePlan) -> int:
        """Publish the written slots of ``plan``; returns the pages published.

        A page that another store published meanwhile keeps that copy, and this
        slot goes back to the pool."""
        index = self.host.index
        fresh = [(p, s) for p, s in zip(plan.positions, plan.slots) if keys[p] not in index]
        self.host.abort([s for p, s in zip(plan.positions, plan.slots) if keys[p] in index])
        if not fresh:
            return 0
        new_keys = [keys[p] for p, _ in fresh]
        slots = [s for _, s in fresh]
        self.host.commit(new_keys, slots, [keys[p - 1] if p else None for p, _ in fresh])
        self._stats.num_stored_pages += len(new_keys)
        if self._l3 is not None:
            self._due.update(new_keys)
            if self.config.l3.write_policy == "write_through":
                self._put_to_l3(new_keys, slots)
        return len(new_keys)

    def abort_store(self, plan: StorePlan) -> None:
        """Give back the slots of a store that will not be committed."""
        self.host.abort(plan.slots)

    # ---- L3 writes ----------------------------------------------------------------
    def _on_evict(self, keys: list[PageKey], slots: list[int]) -> None:
        self._stats.num_evicted_pages += len(keys)
        due = [(k, s) for k, s in zip(keys, slots) if k in self._due]
        if due:
            num_written = self._put_to_l3([k for k, _ in due], [s for _, s in due])
            self._stats.num_l3_dropped_pages += len(due) - num_written
            self._due.difference_update(k for k, _ in due)

    def _put_to_l3(self, keys: list[PageKey], slots: list[int], timeout_s: float | None = None) -> int:
        """Write pages to L3; the ones written stop being due. Returns how many."""
        values = [self.pool.slot_view(s) for s in slots]
        try:
            stored = self._l3_call(self._l3.put(keys, values), timeout_s)
        except Exception as exc:  # noqa: BLE001 - losing a cached page is allowed, crashing is not
            self._stats.num_l3_errors += 1
            log.warning("L3 put() of %d pages failed: %s", len(keys), exc)
            return 0
        finally:
            del values
        written = [k for k, ok in zip(keys, stored) if ok]
        self._due.difference_update(written)
        self._stats.num_l3_written_pages += len(written)
        return len(written)

    @property
    def num_due_pages(self) -> int:
        """Pages in L2 that L3 does not hold yet (what a flush would write)."""
        return len(self._due)

    def flush(self, deadline_s: float) -> FlushReport:
        """Write every due page down to L3, within ``deadline_s`` seconds."""
        if self._l3 is None or not self._due:
            return FlushReport()
        end = time.monotonic() + deadline_s
        index = self.host.index
        pending = [k for k in self._due if k in index]
        num_written = 0
        for lo in range(0, len(pending), _FLUSH_BATCH):
            left = end - time.monotonic()
            if left <= 0:
                break
            keys = pending[lo : lo + _FLUSH_BATCH]
            num_written += self._put_to_l3(keys, self.slots_of(keys), min(left, self.config.l3.timeout_s))
        return FlushReport(num_written, len(pending) - num_written)

    # ---- state ------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """A snapshot of the counters (safe to keep)."""
        snapshot = CacheStats(**vars(self._stats))
        snapshot.num_l2_pages = len(self.host.index)
        snapshot.num_due_pages = len(self._due)
        if self._l3 is not None:
            # The connector turns store faults into misses and refused puts; its
            # counters are where they show.
            l3 = self._l3.stats()
            snapshot.num_l3_errors += l3.errors + l3.timeouts
            snapshot.num_l3_bad_values = l3.corrupt + l3.wrong_key + l3.wrong_fingerprint + l3.wrong_size
        return snapshot

    def check_integrity(self, quiescent: bool = False) -> None:
        """Raise if L2's pool, index and leases disagree (``quiescent``: and nothing is held)."""
        self.host.check_integrity(quiescent)

    def close(self, flush_deadline_s: float | None = None) -> FlushReport:
        """Write due pages to L3 (within ``flush_deadline_s``, by default the config's
        ``l3.close_flush_s``), close L3, stop the I/O thread and remove the host
        pool, each even if an earlier step fails. Idempotent."""
        if self._is_closed:
            return FlushReport()
        self._is_closed = True
        deadline = self.config.l3.close_flush_s if flush_deadline_s is None else flush_deadline_s
        report = FlushReport()
        try:
            if self._l3 is not None:
                report = self.flush(deadline)
                self._stats.num_l3_dropped_pages += report.num_failed
                if report.num_failed:
                    log.warning("close: %d of %d pages due to L3 could not be written there",
                                report.num_failed, report.num_failed + report.num_written)
                l3, self._l3 = self._l3, None
                self._l3_call(l3.close())
        finally:
            try:
                if self._runner is not None:
                    self._runner.close()
                    self._runner = None
            finally:
                self.pool.close()
        return report
