"""Prefetch: L3 -> L2 in the background, batch after batch, pages in chain order.

A prefetch walks a chain of keys from its first page missing in L2::

    keys:   A B C D E F G H
    L2:     A . . D . . . .        (B, C, E.. only in L3, or nowhere)
    reads:    [B C]   [E F G]      one existence check per gap, then batched reads
                                   into reserved slots; stops at the first page L3
                                   lacks or fails to return

It runs on the L3 loop and touches the host store only under the cache's lock,
for short in-memory steps (reserve, commit, abort, lease), never while it waits
on L3. While it runs it holds a lease on every page of its chain that is in L2
(there at the start, or read by it), so its own reservations cannot evict the
pages it exists to bring together. When it ends it keeps them leased -- *held*
for the request it was started for -- until a lookup of the chain takes them
(``claim``), ``PrefetchConfig.hold_s`` passes, it is cancelled, or held pages
pass ``max_hold_fraction`` of L2 (the oldest hold goes first): otherwise the
requests that run meanwhile would evict what was read for the next one. Slots it
reserved are given back only after the read that writes them has stopped (the
connector's get_into guarantees that once it returns, raises or is cancelled),
so a cancelled or timed-out read never writes into a slot that has been reused.

Bytes in flight across all prefetches are bounded by a semaphore of batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Callable, Protocol, Sequence

from controller.api import PrefetchTicket
from controller.config import PrefetchConfig
from kvstore.index.host_store import HostStore
from kvstore.page_keys import PageKey

log = logging.getLogger(__name__)


class PrefetchHost(Protocol):
    """What a prefetch needs of the cache core."""

    host: HostStore
    lock: threading.RLock

    def reserve_up_to(self, n: int) -> list[int]: ...

    def staged_page(self, key: PageKey) -> bytes | None: ...

    def count_l3_error(self) -> None: ...

    def observe_l3(self, nbytes: int, seconds: float) -> None:
        """One L3 call answered: a read of ``nbytes`` (0: an existence check) in ``seconds``."""

    def observe_exists(self, keys: Sequence[PageKey], num_found: int) -> None:
        """An existence check of ``keys`` found the first ``num_found``."""


class Prefetch(PrefetchTicket):
    """One running (or finished) prefetch; the ticket handed to the caller."""

    def __init__(self, keys: Sequence[PageKey], start: int) -> None:
        self.keys = tuple(keys)
        self.start = start
        self._num_pages = 0
        self._num_ready = 0
        self._num_failed = 0
        self._is_checking = True
        self._cancelled = False
        self.is_claimed = False
        """Set when the request it was started for went ahead without it (best_effort,
        timeout): its pages are then not held when it ends."""
        self.is_waited_out = False
        """Set when a scheduler waited on it as long as the ``auto`` cost model said it paid:
        the lookup of its request then takes what is ready without waiting again."""
        self._done = threading.Event()
        self._moved = threading.Event()   # set when pages land, the check answers, or it ends
        self._num_moves = 0
        self._cancel: Callable[[], None] | None = None
        self._drop_hold: Callable[["Prefetch"], None] | None = None

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_ready(self) -> int:
        return self._num_ready

    @property
    def num_failed(self) -> int:
        return self._num_failed

    @property
    def num_pending(self) -> int:
        # While an existence check has not answered, every page after the start may
        # still come.
        if self._is_checking and not self._done.is_set():
            return len(self.keys) - self.start - self._num_ready
        return super().num_pending

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    @property
    def is_checking(self) -> bool:
        """True while an existence check has not answered (the first, or a later gap's)."""
        return self._is_checking and not self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)

    @property
    def num_moves(self) -> int:
        """How often it has moved (pages landed, the check answered, it ended)."""
        return self._num_moves

    def wait_for_progress(self, timeout_s: float, seen: int) -> int:
        """Block until it has moved since ``num_moves`` was ``seen`` (more pages ready, the
        existence check answered, the end) or ``timeout_s`` passes; returns ``num_moves``
        (the ``auto`` lookup plans again at each move)."""
        self._moved.clear()
        if self._num_moves == seen and not self._done.is_set():
            self._moved.wait(timeout_s)   # a move after the clear sets it
        return self._num_moves

    def _note_progress(self) -> None:
        self._num_moves += 1   # before the set: a waiter that cleared sees one or the other
        self._moved.set()

    def cancel(self) -> None:
        self.request_cancel()
        self._done.wait()
        if self._drop_hold is not None:
            self._drop_hold(self)

    def request_cancel(self) -> None:
        """Ask the prefetch to stop, without waiting (its slots go back once its read
        in flight has stopped, and it holds nothing afterwards)."""
        self._cancelled = True
        if not self._done.is_set() and self._cancel is not None:
            self._cancel()

    def covers(self, keys: Sequence[PageKey], start: int) -> bool:
        """Whether this prefetch reads (or read) the chain ``keys`` from ``start`` on."""
        n = len(keys)
        return (self.start == start and len(self.keys) >= n and n > 0
                and self.keys[n - 1] == keys[n - 1])


class CompletedPrefetch(PrefetchTicket):
    """The ticket for a chain with nothing to bring up (all in L2, or no L3)."""

    num_pages = num_ready = num_failed = 0
    is_done = True

    def wait(self, timeout_s: float | None = None) -> bool:
        return True

    def cancel(self) -> None:
        return None


class Prefetcher:
    """Starts prefetches on the L3 loop and keeps the running ones findable."""

    def __init__(self, core: PrefetchHost, l3, loop: asyncio.AbstractEventLoop,
                 config: PrefetchConfig, page_bytes: int) -> None:
        self._core = core
        self._l3 = l3
        self._loop = loop
        self._config = config
        batch_bytes = max(1, config.batch_pages * page_bytes)
        self._num_batch_slots = max(1, config.max_inflight_bytes // batch_bytes)
        self._inflight: asyncio.Semaphore | None = None   # made on the loop
        self._running: dict[PageKey, Prefetch] = {}      # first missing key -> prefetch
        # finished prefetches whose pages are held for their request, oldest first:
        # prefetch -> (release time, its leased keys)
        self._held: OrderedDict[Prefetch, tuple[float, list[PageKey]]] = OrderedDict()
        self._held_by_start: dict[PageKey, Prefetch] = {}
        self.num_held_pages = 0
        self._max_held_pages = int(config.max_hold_fraction * core.host.capacity)
        self.num_inflight_batches = 0
        self.idle = asyncio.Event()                        # set while no batch is in flight
        self.idle.set()

    def find(self, keys: Sequence[PageKey], start: int) -> Prefetch | None:
        """A running prefetch of this chain from ``start``; call under the core lock."""
        running = self._running.get(keys[start])
        return running if running is not None and running.covers(keys, start) else None

    def start(self, keys: Sequence[PageKey], start: int, leased: list[PageKey],
              batch_pages: int | None = None) -> Prefetch:
        """Start reading ``keys[start:]``; call under the core lock. ``leased``: the
        chain's L2 pages from ``start`` on, which the caller has just leased for it (the
        prefetch releases them when it ends, or holds them for their request)."""
        ticket = Prefetch(keys, start)
        self._running[keys[start]] = ticket
        future = asyncio.run_coroutine_threadsafe(
            self._run(ticket, leased, batch_pages or self._config.batch_pages), self._loop)
        ticket._cancel = future.cancel
        ticket._drop_hold = self._drop_hold_locking
        return ticket

    async def _run(self, ticket: Prefetch, leased: list[PageKey], batch_pages: int) -> None:
        try:
            await self._read_chain(ticket, leased, batch_pages)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - a prefetch that breaks is a miss, never an engine error
            log.exception("prefetch failed; its pages count as misses")
        finally:
            with self._core.lock:
                if self._running.get(ticket.keys[ticket.start]) is ticket:
                    del self._running[ticket.keys[ticket.start]]
                if (ticket._num_ready and not ticket._cancelled and not ticket.is_claimed
                        and self._config.hold_s > 0):
                    self._hold(ticket, leased)
                else:
                    self._core.host.release(leased)
            ticket._num_failed = max(0, ticket._num_pages - ticket._num_ready)
            ticket._done.set()
            ticket._note_progress()

    # ---- holds (all under the core lock) ----------------------------------------------
    def _hold(self, ticket: Prefetch, leased: list[PageKey]) -> None:
        start_key = ticket.keys[ticket.start]
        older = self._held_by_start.get(start_key)
        if older is not None:
            self._release_hold(older)
        self._held[ticket] = (time.monotonic() + self._config.hold_s, leased)
        self._held_by_start[start_key] = ticket
        self.num_held_pages += len(leased)
        while self.num_held_pages > self._max_held_pages and self._held:
            self._release_hold(next(iter(self._held)))

    def _release_hold(self, ticket: Prefetch) -> None:
        self._core.host.release(self._end_hold(ticket))

    def _end_hold(self, ticket: Prefetch) -> list[PageKey]:
        """Forget ``ticket``'s hold; the keys it leased (to be released), or []."""
        held = self._held.pop(ticket, None)
        if held is None:
            return []
        start_key = ticket.keys[ticket.start]
        if self._held_by_start.get(start_key) is ticket:
            del self._held_by_start[start_key]
        self.num_held_pages -= len(held[1])
        return held[1]

    def _drop_hold_locking(self, ticket: Prefetch) -> None:
        with self._core.lock:
            self._release_hold(ticket)

    def claim(self, hit: Sequence[PageKey]) -> list[PageKey]:
        """A lookup leased ``hit``: the holds of finished prefetches of that chain end
        (their pages now have the lookup's lease); expired holds end too. Returns the
        keys whose hold ended, for the caller to release (a lookup calls the prefetcher,
        never the other way round). Call under the core lock."""
        ended: list[PageKey] = []
        if not self._held:
            return ended
        now = time.monotonic()
        while self._held:
            ticket, (deadline, _) = next(iter(self._held.items()))
            if deadline > now:
                break
            ended += self._end_hold(ticket)
        for key in hit:
            ticket = self._held_by_start.get(key)
            if ticket is not None:
                ended += self._end_hold(ticket)
        return ended

    def held_leases(self) -> Counter:
        """Leases the holds keep, per key (what an idle cache may still show)."""
        return Counter(key for _, keys in self._held.values() for key in keys)

    def stop(self) -> None:
        """Cancel every running prefetch (waiting for its reads to stop) and end every
        hold. Call without the core lock: a prefetch needs it to finish."""
        with self._core.lock:
            running = list(self._running.values())
        for ticket in running:
            ticket.cancel()
        with self._core.lock:
            for ticket in list(self._held):
                self._release_hold(ticket)

    async def _read_chain(self, ticket: Prefetch, leased: list[PageKey], batch_pages: int) -> None:
        keys, pos = ticket.keys, ticket.start
        index = self._core.host.index
        while pos < len(keys):
            with self._core.lock:
                while pos < len(keys) and keys[pos] in index:   # an L2 run, leased at start
                    pos += 1
                gap_end = next((j for j in range(pos, len(keys)) if keys[j] in index), len(keys))
            if pos >= len(keys):
                return
            while pos < gap_end:
                # Pages evicted a moment ago may still wait for their L3 write: take them
                # from the backup queue, then ask L3 for the rest.
                with self._core.lock:
                    staged = self._take_staged(keys, pos, gap_end, leased)
                ticket._num_pages += staged
                ticket._num_ready += staged
                if staged:
                    ticket._note_progress()
                pos += staged
                if pos >= gap_end:
                    break
                if not ticket._is_checking:   # a later gap's check: what comes is open again
                    ticket._is_checking = True
                    ticket._note_progress()
                num_in_l3 = await self._exists(keys[pos:gap_end])
                ticket._num_pages += num_in_l3
                ticket._is_checking = False
                ticket._note_progress()
                got = await self._read_run(ticket, keys, pos, pos + num_in_l3, leased, batch_pages)
                pos += got
                # L3 lacks keys[pos] (the check stopped there): unless the backup queue has
                # it meanwhile, the chain breaks here and later pages are no use to a prefix
                # (asking L3 again would only cost a round trip).
                if got < num_in_l3 or (pos < gap_end and self._core.staged_page(keys[pos]) is None):
                    return

    async def _exists(self, keys: Sequence[PageKey]) -> int:
        try:
            started = time.perf_counter()
            found = await self._l3.exists(keys)
            self._core.observe_l3(0, time.perf_counter() - started)
            self._core.observe_exists(keys, found)
            if found < len(keys):
                self._core.note_l3_read([], None, keys[found])
            return found
        except Exception as exc:  # noqa: BLE001 - an L3 outage is a miss
            self._core.count_l3_error()
            log.warning("L3 exists() failed, treating as miss: %s", exc)
            return 0

    async def _read_run(self, ticket: Prefetch, keys: Sequence[PageKey], lo: int, hi: int,
                        leased: list[PageKey], batch_pages: int) -> int:
        """Read ``keys[lo:hi]`` into L2 in batches; returns how many leading pages arrived."""
        if self._inflight is None:
            self._inflight = asyncio.Semaphore(self._num_batch_slots)
        pos = lo
        while pos < hi:
            async with self._inflight:
                n, num_slots = await self._read_batch(keys, pos, min(hi, pos + batch_pages), leased)
            ticket._num_ready += n
            ticket._note_progress()
            # Fewer slots than pages (L2 short of unleased pages) is not a break in the
            # chain: read on with what the next reservation gets. No slot at all, or a
            # page L3 did not return, ends it.
            if not num_slots or n < num_slots:
                return pos + n - lo
            pos += n
        return hi - lo

    async def _read_batch(self, keys: Sequence[PageKey], lo: int, hi: int,
                          leased: list[PageKey]) -> tuple[int, int]:
        """Read the leading pages of ``keys[lo:hi]`` that slots can be reserved for;
        returns (pages that arrived, slots reserved)."""
        core, host = self._core, self._core.host
        with core.lock:
            slots = core.reserve_up_to(hi - lo)
        if not slots:
            return 0, 0
        wanted = list(keys[lo : lo + len(slots)])
        self.num_inflight_batches += 1
        self.idle.clear()
        committed = False
        try:
            views = [host.pool.slot_view(s) for s in slots]
            try:
                started = time.perf_counter()
                found = await self._l3.get_into(wanted, views)
                if any(found):   # a read of what L3 holds: the rate the cost model plans with
                    self._core.observe_l3(sum(found) * host.pool.slot_bytes, time.perf_counter() - started)
                num_ok = next((i for i, ok in enumerate(found) if not ok), len(found))
                self._core.note_l3_read(wanted[:num_ok], keys[lo - 1] if lo else None,
                                        wanted[num_ok] if num_ok < len(wanted) else None)
            except Exception as exc:  # noqa: BLE001
                core.count_l3_error()
                log.warning("L3 get_into() failed, treating as miss: %s", exc)
                found = [False] * len(wanted)
            finally:
                del views
            num_ok = next((i for i, ok in enumerate(found) if not ok), len(found))
            with core.lock:
                self._commit(keys, lo, wanted[:num_ok], slots, leased)
            committed = True
            return num_ok, len(slots)
        finally:
            if not committed:   # cancelled: the read has stopped, the slots may go back
                with core.lock:
                    host.abort(slots)
            self.num_inflight_batches -= 1
            if not self.num_inflight_batches:
                self.idle.set()

    def _take_staged(self, keys: Sequence[PageKey], lo: int, hi: int, leased: list[PageKey]) -> int:
        """Copy the leading pages of ``keys[lo:hi]`` that wait in the backup queue into L2
        (under the lock); returns how many."""
        pages = []
        for key in keys[lo:hi]:
            data = self._core.staged_page(key)
            if data is None:
                break
            pages.append(data)
        slots = self._core.reserve_up_to(len(pages)) if pages else []
        for slot, data in zip(slots, pages):
            self._core.host.pool.slot_view(slot)[:] = data
        self._commit(keys, lo, list(keys[lo : lo + len(slots)]), slots, leased)
        return len(slots)

    def _commit(self, keys: Sequence[PageKey], lo: int, arrived: list[PageKey], slots: list[int],
                leased: list[PageKey]) -> None:
        """Publish the arrived pages (under the lock); a page stored meanwhile keeps that
        copy. Every arrived page ends up leased by this prefetch."""
        host = self._core.host
        index = host.index
        fresh = [(i, s) for i, (k, s) in enumerate(zip(arrived, slots)) if k not in index]
        keep = {s for _, s in fresh}
        host.abort([s for s in slots if s not in keep])
        host.commit([arrived[i] for i, _ in fresh], [s for _, s in fresh],
                    [keys[lo + i - 1] if lo + i else None for i, _ in fresh])
        held = set(leased)
        new_lease = [k for k in arrived if k not in held]
        host.lease(new_lease)
        leased.extend(new_lease)
