"""CacheCore: the device-free half of the cache -- L2 (a host store in shm), the L3
connector and the pipelines between them (prefetch up, backup down).

The embedded controller drives one core from the engine's thread; the daemon
drives one from its request loop. The core never touches a device: the caller
moves bytes between its device pool and the slots the core names.

Threads: the callers' thread and the L3 loop (``AsyncRunner``), where the
prefetch and backup pipelines run. Every change to the host store happens
under ``lock``, held only for in-memory steps: nobody holds it while waiting on
L3, so neither side can stall the other for an I/O's length.

Data paths::

    lookup:  L2 prefix, leased; pages only in L3 come up by a prefetch
             (controller/pipelines/prefetch.py), waited for per PrefetchConfig.policy
    store:   begin_store reserves slots -> the caller writes them -> commit_store publishes
    backup:  due pages --queue--> L3 (write_through at commit, write_through_selective
             after N hits, write_back at eviction; controller/pipelines/backup.py)
    close:   every due page --> L3 within a deadline, then L3 closes, shm goes

A page is *due* while L2 holds it and L3 is not known to: from its commit until
a put succeeds. Pages read from L3 are never due.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from operator import not_
from typing import Callable, NamedTuple, Sequence

import numpy as np

from controller.api import CacheError, CacheStats
from controller.async_runner import AsyncRunner
from controller.config import ConfigError, ControllerConfig
from controller.pipelines.backup import BackupQueue
from controller.pipelines.cost_model import Progress, new_cost_model, wait_auto
from controller.pipelines.prefetch import Prefetch, Prefetcher
from kvstore.host_pool import HostPool
from kvstore.index.host_store import HostStore
from kvstore.index.observer import NO_OBSERVERS, CoreObservers
from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey

log = logging.getLogger(__name__)



class LookupOutcome(NamedTuple):
    """What ``CacheCore.lookup`` leased: ``num_l2 + num_l3`` leading pages; ``num_pending``
    more are still coming up from L3 by ``prefetch`` (best_effort / timeout / no wait)."""

    num_l2: int
    num_l3: int
    num_pending: int = 0
    prefetch: Prefetch | None = None


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


_CLOSE_GRACE_S = 5.0
"""Longest close waits, past the flush deadline, for the backup batch being written."""


class CacheCore:
    """L2 + L3 + the pipelines; see the module docstring."""

    def __init__(self, config: ControllerConfig, layout: KVLayout,
                 observers: CoreObservers = NO_OBSERVERS, *, pool: HostPool | None = None,
                 lock: threading.RLock | None = None, admit: Callable[["CacheCore", int], int] | None = None,
                 wrap_l3: Callable | None = None) -> None:
        """``observers`` hear what enters and leaves L2 and what this core learns of L3
        (the daemon's KV events; kvstore/index/observer.py). ``pool``, ``lock``, ``admit``
        and ``wrap_l3`` are for a daemon that runs several cores under one memory budget
        (controller/daemon/pools.py): a pool it made, a lock all its cores share, a hook
        that makes room in the budget before ``n`` slots are reserved here (it answers how
        many may be), and a wrapper of the L3 connector (a tenant's key salt and quota)."""
        self.config = config
        self.layout = layout
        self.observers = observers
        self.lock = lock if lock is not None else threading.RLock()
        self._admit = admit
        self._wrap_l3 = wrap_l3
        self._stats = CacheStats()
        # Pages L3 lacks -> their position in their chain (0: a chain's first page), so a
        # flush writes parents before children: what a cut-short flush wrote is usable.
        self._due: dict[PageKey, int] = {}
        self._hits_while_due: Counter[PageKey] = Counter()   # write_through_selective
        self._runner: AsyncRunner | None = None
        self._l3 = None
        self._prefetcher: Prefetcher | None = None
        self._backup: BackupQueue | None = None
        self._is_closed = False
        if pool is None:
            pool = HostPool(layout, config.host_pool_pages, prefault=config.prefault_host_pool)
        self.host = HostStore(pool, policy=config.eviction_policy, on_evict=self._on_evict,
                              observer=observers.l2)
        self.cost = new_cost_model(config.prefetch, layout.page_size, pool.slot_bytes)
        """The ``auto`` policy's rates and choices (fed by the prefetcher and the client)."""
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

        options = dict(self.config.l3.options)
        options.setdefault("fingerprint", self.layout.fingerprint())
        options.update(self._l3_encoding_options())
        self._runner = AsyncRunner()

        async def open_on_loop():
            # A connector belongs to the loop it is created on; create it on the runner's.
            return open_connector(self.config.l3.connector, **options)

        try:
            self._l3 = self._runner.run(open_on_loop(), self.config.l3.timeout_s)
            if self._wrap_l3 is not None:
                self._l3 = self._wrap_l3(self._l3)
        except BaseException:
            self._runner.close()
            raise
        loop = self._runner.loop
        self._prefetcher = Prefetcher(self, self._l3, loop, self.config.prefetch, self.pool.slot_bytes)
        self._backup = BackupQueue(self, self._l3, loop, self.config.l3.backup_queue_bytes,
                                   lambda: self._prefetcher.idle)

    def _l3_encoding_options(self) -> dict:
        """Connector options for L3Config.encoding: fp8 pages get one scale per page of one
        layer's K or V (a chunk), so keys, values and layers are scaled apart."""
        encoding = self.config.l3.encoding
        if encoding == "lossless":
            return {}
        if self.layout.dtype != "bfloat16":
            raise ConfigError(f"L3Config.encoding {encoding!r} needs a bfloat16 layout, this one "
                              f"is {self.layout.dtype}; use encoding='lossless'")
        return {"encoding": encoding, "encoding_group_elems": self.layout.chunk_numel}

    def check_open(self) -> None:
        if self._is_closed:
            raise CacheError("this cache client is closed; connect() again to use the cache")

    # ---- lookup and prefetch ---------------------------------------------------------
    def lookup(self, keys: Sequence[PageKey], wait: bool = True,
               start_prefetch: bool = True, num_counted: int | None = None) -> LookupOutcome:
        """Lease the longest cached prefix of a chain (one lease per page).

        Pages only in L3 come up through a prefetch (one is started unless
        ``start_prefetch`` is False); how long this waits for it is
        ``config.prefetch.policy``'s choice (see PrefetchConfig), or not at all when
        ``wait`` is False (the daemon, whose clients wait without holding its loop).

        ``num_counted``: this lookup completes an earlier one of the same chain (the
        daemon's client looks again after waiting on the prefetch) that already counted
        the lookup and its first ``num_counted`` hit pages; only the pages hit beyond
        them are counted, as L3 hits."""
        self.check_open()
        keys = list(keys)
        with self.lock:
            num_hit = self.host.lease_prefix(keys)  # one walk of the radix runs, not per page
            ticket, in_l2_after_gap = None, []
            if num_hit < len(keys) and self._prefetcher is not None:
                # Pages past the gap that L2 holds now count as L2 hits if the gap fills.
                in_l2_after_gap = [s is not None for s in self.host.index.get_many(keys[num_hit:])]
                ticket = self._prefetch_locked(keys, num_hit, in_l2_after_gap, start_prefetch)
        num_pending, first_missing = 0, num_hit
        if ticket is not None:
            try:
                if wait:
                    self._wait_per_policy(ticket, num_hit, keys)
            finally:
                with self.lock:
                    num_hit += self.host.index.match_prefix(keys[first_missing:])
                    self.host.lease(keys[first_missing:num_hit])
            num_pending = 0 if ticket.is_done else ticket.num_pending
            if wait and not ticket.is_done:
                ticket.is_claimed = True   # its request goes ahead now: nothing to hold for
                if not num_pending:
                    # Every page is up and leased for this lookup; only the prefetch's end
                    # is left (it releases its own leases then). Wait for it, so that a
                    # lookup never returns while a finished prefetch still leases pages.
                    ticket.wait(self.config.l3.timeout_s)
        # Pages of the hit that were in L2 when asked count as L2 hits (a run after a
        # gap too); the rest came up from L3.
        num_l2 = self._num_l2_of(num_hit, first_missing, in_l2_after_gap)
        with self.lock:
            if num_counted is None:
                self._count_hits(keys[:num_hit], len(keys), num_l2, num_hit - num_l2)
            else:
                self._count_more_hits(keys[:num_hit], num_counted)
            if self._prefetcher is not None:
                self.host.release(self._prefetcher.claim(keys[:num_hit]))
            if wait:   # the daemon's clients choose (and count) for themselves
                num_hit = self._choose_locked(keys, num_hit, num_pending)
                num_l2 = self._num_l2_of(num_hit, first_missing, in_l2_after_gap)
                self._stats.num_loaded_l2_pages += num_l2
                self._stats.num_loaded_l3_pages += num_hit - num_l2
        return LookupOutcome(num_l2, num_hit - num_l2, num_pending, ticket)

    def _choose_locked(self, keys: list[PageKey], num_hit: int, num_pending: int) -> int:
        """``auto``: the leading hit pages worth loading (the lease of the rest ends now)."""
        num_use = num_hit
        if self.config.prefetch.policy == "auto":
            if num_hit:   # a miss has nothing to choose: no plan on its path (0% cached)
                num_use = self.cost.plan(len(keys) * self.layout.page_size, num_hit, 0).num_pages
            self.host.release(keys[num_use:num_hit])
            self._stats.num_recomputed_by_choice_pages += num_hit - num_use + num_pending
        return num_use

    def count_loaded(self, num_l2: int, num_l3: int) -> None:
        """Pages a client hands to its engine to load, per tier they were served from."""
        with self.lock:
            self._stats.num_loaded_l2_pages += num_l2
            self._stats.num_loaded_l3_pages += num_l3

    def count_recomputed_by_choice(self, num_pages: int) -> None:
        """Pages a daemon client's cost model chose to recompute (it decides client-side)."""
        with self.lock:
            self._stats.num_recomputed_by_choice_pages += num_pages

    def observe_l3(self, nbytes: int, seconds: float) -> None:
        self.cost.observe_l3(nbytes, seconds)

    def observe_exists(self, keys: Sequence[PageKey], num_found: int) -> None:
        self.cost.observe_exists_keys(keys, num_found)

    def observe_l3_write(self, nbytes: int, seconds: float) -> None:
        self.cost.observe_l3_write(nbytes, seconds)

    @staticmethod
    def _num_l2_of(num_hit: int, first_missing: int, in_l2_after_gap: list[bool]) -> int:
        """Of the first ``num_hit`` pages, those L2 held when asked: all before the first
        gap, and the ones after it that were there already."""
        return min(num_hit, first_missing) + sum(in_l2_after_gap[:max(0, num_hit - first_missing)])

    def _wait_per_policy(self, ticket: Prefetch, num_l2: int, keys: list[PageKey]) -> None:
        policy = self.config.prefetch
        num_tokens = len(keys) * self.layout.page_size
        if policy.policy == "auto":
            if ticket.is_waited_out:   # its request already waited as long as it paid
                return

            seen = ticket.num_moves

            def poll(wait_s: float) -> Progress:
                nonlocal seen
                if wait_s:   # woken by each batch that lands: the plan may say go sooner
                    seen = ticket.wait_for_progress(wait_s, seen)
                is_checking, is_done, pending = ticket.is_checking, ticket.is_done, ticket.num_pending
                known = None
                with self.lock:   # the ready prefix as L2 has it (an L2 run after a gap counts)
                    ready = num_l2 + self.host.index.match_prefix(keys[num_l2:])
                    if is_checking:   # what L3 is known to hold, or L2 or the backup queue has
                        known = self.cost.num_known(keys[ready:], lambda k: k in self.host.index
                                                    or self.staged_page(k) is not None)
                if is_checking:
                    pending = len(keys) - ready
                return Progress(ready, pending, is_checking, is_done, known)

            wait_auto(self.cost, num_tokens, poll, 4 * self.config.l3.timeout_s)
        elif policy.policy in ("wait_complete", "sync"):
            # An L3 read that hangs ends by its own timeout; this bound is only a backstop.
            ticket.wait(4 * self.config.l3.timeout_s)
        elif policy.policy == "timeout":
            ticket.wait(policy.timeout_base_s + policy.timeout_per_1k_tokens_s * num_tokens / 1000)

    def _count_hits(self, hits: list[PageKey], num_asked: int, num_l2: int, num_l3: int) -> None:
        self.host.touch(hits)
        stats = self._stats
        stats.num_lookups += 1
        stats.num_lookup_pages += num_asked
        stats.num_l2_hit_pages += num_l2
        stats.num_l3_hit_pages += num_l3
        self._note_selective_hits(hits)

    def _count_more_hits(self, hits: list[PageKey], num_counted: int) -> None:
        """The second half of a lookup counted by ``_count_hits`` (see ``lookup``)."""
        self.host.touch(hits)
        self._stats.num_l3_hit_pages += max(0, len(hits) - num_counted)
        self._note_selective_hits(hits[num_counted:])

    def _note_selective_hits(self, hits: list[PageKey]) -> None:
        if self.config.l3.write_policy == "write_through_selective" and self._backup is not None:
            due = [k for k in hits if k in self._due]
            self._hits_while_due.update(due)
            ripe = [k for k in due if self._hits_while_due[k] >= self.config.l3.selective_hits]
            if ripe:
                self._backup.add_resident(ripe, [self._due[k] for k in ripe])

    def prefetch(self, keys: Sequence[PageKey]) -> Prefetch | None:
        """Start bringing the L3 pages of a chain into L2 (a hint); None when L2 holds
        all of it or there is no L3. Never waits on L3."""
        self.check_open()
        keys = list(keys)
        with self.lock:
            start = self.host.index.match_prefix(keys)
            return self._prefetch_locked(keys, start) if start < len(keys) else None

    def _prefetch_locked(self, keys: list[PageKey], start: int, in_l2: list[bool] | None = None,
                         may_start: bool = True) -> Prefetch | None:
        """The running prefetch of ``keys[start:]``, or (``may_start``) a new one. ``in_l2``:
        per key from ``start``, whether L2 holds it (asked here when not given). Calls
        go one way, core -> prefetcher: the pages the new prefetch keeps leased are
        leased here and handed to it."""
        if self._prefetcher is None:
            return None
        running = self._prefetcher.find(keys, start)
        if running is not None or not may_start:
            return running
        if in_l2 is None:
            in_l2 = [s is not None for s in self.host.index.get_many(keys[start:])]
        leased = [k for k, there in zip(keys[start:], in_l2) if there]
        self.host.lease(leased)
        whole = len(keys) if self.config.prefetch.policy == "sync" else None
        return self._prefetcher.start(keys, start, leased, batch_pages=whole)

    def reserve_up_to(self, n: int) -> list[int]:
        """As many slots as possible up to ``n`` (leased pages can't be evicted for them).
        Call under ``lock``."""
        if self._admit is not None and n > 0:
            n = self._admit(self, n)   # the shared budget makes room (other cores may evict)
        while n > 0:
            slots = self.host.reserve(n)
            if slots is not None:
                return slots
            n //= 2
        return []

    def slots_of(self, keys: Sequence[PageKey]) -> list[int]:
        """Slots of present pages (leased ones stay put); raises KeyError for an absent one."""
        with self.lock:
            return self.host.slots_of(keys)

    def slot_array(self, keys: Sequence[PageKey]) -> np.ndarray:
        """``slots_of`` as an int64 array (the daemon packs it for the wire as one)."""
        with self.lock:
            return self.host.slot_array(keys)

    def release(self, keys: Sequence[PageKey]) -> None:
        """End one lease on each key (all or nothing)."""
        with self.lock:
            self.host.release(keys)

    # ---- store ------------------------------------------------------------------
    def begin_store(self, keys: Sequence[PageKey]) -> StorePlan:
        """Reserve slots for the pages of a chain that L2 lacks; present ones count as hits."""
        self.check_open()
        with self.lock:
            present = self.host.index.contains_many(keys)
            if any(present):
                self.host.touch(list(compress(keys, present)))
            absent = list(compress(range(len(keys)), map(not_, present)))
            slots = self.reserve_up_to(len(absent)) if absent else []
        return StorePlan(tuple(absent[: len(slots)]), tuple(slots), len(absent) - len(slots))

    def commit_store(self, keys: Sequence[PageKey], plan: StorePlan) -> int:
        """Publish the written slots of ``plan``; returns the pages published.

        A page that another store published meanwhile keeps that copy, and this
        slot goes back to the pool."""
        with self.lock:
            positions, slots = list(plan.positions), list(plan.slots)
            new_keys = list(map(keys.__getitem__, positions))
            taken = self.host.index.contains_many(new_keys)   # published meanwhile by another store
            if any(taken):
                self.host.abort(list(compress(slots, taken)))
                kept = list(map(not_, taken))
                positions, slots = list(compress(positions, kept)), list(compress(slots, kept))
                new_keys = list(compress(new_keys, kept))
            if not new_keys:
                return 0
            self.host.commit(new_keys, slots, [keys[p - 1] if p else None for p in positions])
            self._stats.num_stored_pages += len(new_keys)
            if self._backup is not None:
                self._due.update(zip(new_keys, positions))   # a page's depth is its position
                if self.config.l3.write_policy == "write_through":
                    self._backup.add_resident(new_keys, positions)
            return len(new_keys)

    def abort_store(self, plan: StorePlan) -> None:
        """Give back the slots of a store that will not be committed."""
        with self.lock:
            self.host.abort(plan.slots)

    # ---- backup (called by the pipelines, under the lock) --------------------------------
    def _on_evict(self, keys: list[PageKey], slots: list[int]) -> None:
        """Due pages leaving L2 are copied out for the backup queue (their slots are
        reused at once); what does not fit in its memory is dropped and counted."""
        self._stats.num_evicted_pages += len(keys)
        if self._due.keys().isdisjoint(keys):
            return
        due = [(k, s) for k, s in zip(keys, slots) if k in self._due]
        if not due:
            return
        depths = [self._due.pop(k) for k, _ in due]
        for key, _ in due:
            self._hits_while_due.pop(key, None)
        dropped = self._backup.add_evicted([k for k, _ in due], [self.pool.slot_view(s) for _, s in due],
                                           depths)
        self._stats.num_l3_dropped_pages += dropped

    def on_backup_result(self, keys: list[PageKey], stored: list[bool], evicted: bool) -> None:
        """Count a finished put; written pages stop being due."""
        written = [k for k, ok in zip(keys, stored) if ok]
        self._stats.num_l3_written_pages += len(written)
        self.cost.note_l3(written)
        self.observers.l3.stored(written, None)   # pages of several chains: no parent
        for key in written:
            self._due.pop(key, None)
            self._hits_while_due.pop(key, None)
        if evicted:
            self._stats.num_l3_dropped_pages += len(keys) - len(written)

    def note_l3_read(self, keys: list[PageKey], parent: PageKey | None, missing: PageKey | None) -> None:
        """What a read of L3 showed: ``keys`` (a chain after ``parent``) are there, and
        ``missing`` (the page after them) is not, whoever removed it."""
        self.cost.note_l3(keys, missing)
        self.observers.l3.stored(keys, parent)
        if missing is not None:
            self.observers.l3.removed([missing])

    def staged_page(self, key: PageKey) -> bytes | None:
        """An evicted page's bytes still waiting in the backup queue (under ``lock``)."""
        return self._backup.staged_page(key) if self._backup is not None else None

    def count_l3_error(self) -> None:
        with self.lock:
            self._stats.num_l3_errors += 1

    def drain_backups(self, timeout_s: float) -> bool:
        """Wait until the backup queue is empty (every queued page written or failed)."""
        return self._backup is None or self._backup.drain(timeout_s)

    def flush(self, deadline_s: float) -> FlushReport:
        """Write every due page (and whatever the backup queue holds) down to L3, within
        ``deadline_s`` seconds, parents before children (by chain position, over all
        chains), so that pages written before the deadline form usable prefixes. Pages
        stay in L2."""
        if self._backup is None:
            return FlushReport()
        asked, written_before = self._start_flush()
        self._backup.drain(deadline_s)
        return self._flush_report(asked, written_before, self._backup.num_staged_pages)

    def _start_flush(self) -> tuple[set[PageKey], int]:
        """Queue every due page still in L2 and order the queue parents first; (the due
        pages, the written count so far)."""
        with self.lock:
            asked = set(self._due)
            resident = [k for k in asked if k in self.host.index]
            self._backup.add_resident(resident, [self._due[k] for k in resident])
            self._backup.sort_by_depth()
            return asked, self._stats.num_l3_written_pages

    def _flush_report(self, asked: set[PageKey], written_before: int, num_staged: int) -> FlushReport:
        with self.lock:
            # Due pages still only in L2, and evicted pages whose copy was not written.
            num_failed = len(asked & self._due.keys()) + num_staged
            return FlushReport(self._stats.num_l3_written_pages - written_before, num_failed)

    # ---- state ------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """A snapshot of the counters (safe to keep)."""
        with self.lock:
            snapshot = CacheStats(**vars(self._stats))
            snapshot.num_l2_pages = len(self.host.index)
            snapshot.num_due_pages = len(self._due)
            rates = self.cost.rates()
            snapshot.l3_read_latency_s = rates["l3_latency_s"] or 0.0
            snapshot.l3_read_gbps = rates["l3_read_gbps"] or 0.0
            if self._prefetcher is not None:
                snapshot.num_prefetch_held_pages = self._prefetcher.num_held_pages
            if self._backup is not None:
                snapshot.num_backup_queue_pages = self._backup.num_pages
                snapshot.backup_queue_bytes = self._backup.staged_bytes
                snapshot.backup_lag_s = self._backup.lag_s
        if self._l3 is not None:
            # The connector turns store faults into misses and refused puts; its
            # counters are where they show.
            l3 = self._l3.stats()
            snapshot.num_l3_errors += l3.errors + l3.timeouts + l3.write_errors
            snapshot.num_l3_bad_values = (l3.corrupt + l3.wrong_key + l3.wrong_fingerprint
                                          + l3.wrong_size + l3.wrong_encoding)
            snapshot.l3_bytes_read = l3.bytes_in
            snapshot.l3_bytes_written, snapshot.l3_page_bytes_written = l3.bytes_out, l3.raw_bytes_out
        return snapshot

    def l3_health(self):
        """The L3 store's health (connectors.health.HealthSnapshot), None without L3."""
        l3 = self._l3
        return l3.health() if l3 is not None else None

    def check_integrity(self, quiescent: bool = False) -> None:
        """Raise if L2's pool, index and leases disagree (``quiescent``: and nothing is held)."""
        with self.lock:
            held = self._prefetcher.held_leases() if self._prefetcher is not None else None
            self.host.check_integrity(quiescent, held)

    def close(self, flush_deadline_s: float | None = None) -> FlushReport:
        """Stop prefetches, write due pages to L3 (within ``flush_deadline_s``, by default
        the config's ``l3.close_flush_s``), close L3, stop the I/O thread and remove the
        host pool, each even if an earlier step fails. Idempotent."""
        if self._is_closed:
            return FlushReport()
        self._is_closed = True
        deadline = self.config.l3.close_flush_s if flush_deadline_s is None else flush_deadline_s
        report = FlushReport()
        try:
            if self._l3 is not None:
                report = self._close_l3(deadline)
        finally:
            try:
                if self._runner is not None:
                    self._runner.close()
                    self._runner = None
            finally:
                self.pool.close()
        return report

    def _close_l3(self, deadline_s: float) -> FlushReport:
        self._prefetcher.stop()
        # A deadline of 0 writes nothing more; otherwise the batch in flight at the
        # deadline may finish (bounded): see BackupQueue.close.
        if deadline_s > 0:
            asked, written_before = self._start_flush()
            self._backup.drain(deadline_s)
            num_staged_lost = self._backup.close(min(self.config.l3.timeout_s, _CLOSE_GRACE_S))
        else:
            with self.lock:
                asked, written_before = set(self._due), self._stats.num_l3_written_pages
            num_staged_lost = self._backup.close()
        report = self._flush_report(asked, written_before, num_staged_lost)
        self._stats.num_l3_dropped_pages += report.num_failed
        if report.num_failed:
            log.warning("close: %d of %d pages due to L3 were not written there within the flush "
                        "deadline of %.1f s (or L3 refused them); they are lost (raise the deadline: "
                        "close_flush_s, or the daemon's flush_deadline_s)",
                        report.num_failed, report.num_failed + report.num_written, deadline_s)
        l3, self._l3 = self._l3, None
        self._runner.run(l3.close(), self.config.l3.timeout_s)
        return report
