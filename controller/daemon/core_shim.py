"""TEMPORARY stand-in for ``controller.core.CacheCore`` until it lands on main.

Same interface as the lead's CacheCore (see controller/core.py once merged);
built from the embedded controller's logic. Delete this file after ``git merge main``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from controller.api import CacheStats
from controller.async_runner import AsyncRunner
from controller.config import ControllerConfig
from kvstore.host_pool import HostPool
from kvstore.host_store import HostStore
from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey

log = logging.getLogger(__name__)


@dataclass
class StorePlan:
    positions: list[int]
    slots: list[int]
    num_skipped: int


@dataclass
class FlushReport:
    num_written: int = 0
    num_failed: int = 0


@dataclass
class CoreStats(CacheStats):
    num_l3_errors: int = 0
    num_l3_written_pages: int = 0
    num_dropped_pages: int = 0


class CacheCore:
    def __init__(self, config: ControllerConfig, layout: KVLayout) -> None:
        self.config = config
        self.layout = layout
        self._stats = CoreStats()
        self._runner: AsyncRunner | None = None
        self._l3 = None
        self._dirty: dict[PageKey, None] = {}  # pages only in L2 (write_back)
        self.pool = HostPool(layout, config.host_pool_pages)
        self.host = HostStore(self.pool, policy=config.eviction_policy, on_evict=self._on_evict)
        if config.l3.connector is not None:
            try:
                self._open_l3()
            except BaseException:
                self.pool.close()
                raise

    def _open_l3(self) -> None:
        from connectors import open_connector

        self._runner = AsyncRunner()
        options = dict(self.config.l3.options)
        options.setdefault("fingerprint", self.layout.fingerprint())

        async def open_on_loop():
            return open_connector(self.config.l3.connector, **options)

        self._l3 = self._l3_call(open_on_loop())

    def _l3_call(self, coro):
        return self._runner.run(coro, self.config.l3.timeout_s)

    # ---- lookup -------------------------------------------------------------
    def lookup(self, keys: Sequence[PageKey]) -> tuple[int, int]:
        index = self.host.index
        in_l2 = [k in index for k in keys]
        held = [k for k, present in zip(keys, in_l2) if present]
        self.host.lease(held)
        num_hit, num_l3 = 0, 0
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
        self.host.release([k for k, present in zip(keys[num_hit:], in_l2[num_hit:]) if present])
        self.host.touch(keys[:num_hit])
        self._stats.num_lookups += 1
        self._stats.num_lookup_pages += len(keys)
        self._stats.num_l2_hit_pages += num_hit - num_l3
        self._stats.num_l3_hit_pages += num_l3
        return num_hit - num_l3, num_l3

    def _fetch_from_l3(self, keys, start, end) -> int:
        try:
            num_present = self._l3_call(self._l3.exists(keys[start:end]))
        except Exception as exc:  # noqa: BLE001
            self._stats.num_l3_errors += 1
            log.warning("L3 exists() failed: %s", exc)
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
            found = [False] * len(wanted)
        del buffers
        num_ok = next((i for i, ok in enumerate(found) if not ok), len(found))
        self.host.abort(slots[num_ok:])
        parents = [keys[i - 1] if i else None for i in range(start, start + num_ok)]
        self.host.commit(wanted[:num_ok], slots[:num_ok], parents)
        self.host.lease(wanted[:num_ok])
        return num_ok

    def _reserve_up_to(self, n: int) -> list[int]:
        while n > 0:
            slots = self.host.reserve(n)
            if slots is not None:
                return slots
            n //= 2
        return []

    def slots_of(self, keys: Sequence[PageKey]) -> list[int]:
        return self.host.slots_of(keys)

    def release(self, keys: Sequence[PageKey]) -> None:
        self.host.release(keys)

    # ---- store --------------------------------------------------------------
    def begin_store(self, keys: Sequence[PageKey]) -> StorePlan:
        index = self.host.index
        absent = [i for i, key in enumerate(keys) if key not in index]
        self.host.touch([key for key in keys if key in index])
        slots = self._reserve_up_to(len(absent)) if absent else []
        return StorePlan(absent[: len(slots)], slots, len(absent) - len(slots))

    def commit_store(self, keys: Sequence[PageKey], plan: StorePlan) -> int:
        index = self.host.index
        fresh = [(i, s) for i, s in zip(plan.positions, plan.slots) if keys[i] not in index]
        dup = [s for i, s in zip(plan.positions, plan.slots) if keys[i] in index]
        self.host.abort(dup)
        if not fresh:
            return 0
        placed = [keys[i] for i, _ in fresh]
        slots = [s for _, s in fresh]
        self.host.commit(placed, slots, [keys[i - 1] if i else None for i, _ in fresh])
        self._stats.num_stored_pages += len(placed)
        if self._l3 is not None:
            if self.config.l3.write_policy == "write_through":
                self._put_to_l3(placed, slots)
            else:
                self._dirty.update(dict.fromkeys(placed))
        return len(placed)

    def abort_store(self, plan: StorePlan) -> None:
        self.host.abort(plan.slots)

    # ---- L3 writes ----------------------------------------------------------
    def _on_evict(self, keys, slots) -> None:
        self._stats.num_evicted_pages += len(keys)
        if self._l3 is not None and self.config.l3.write_policy == "write_back":
            self._put_to_l3(keys, slots)
        for k in keys:
            self._dirty.pop(k, None)

    def _put_to_l3(self, keys, slots) -> int:
        values = [self.pool.slot_view(s) for s in slots]
        try:
            stored = self._l3_call(self._l3.put(list(keys), values))
            ok = sum(bool(x) for x in stored)
        except Exception as exc:  # noqa: BLE001
            self._stats.num_l3_errors += 1
            log.warning("L3 put() of %d pages failed: %s", len(keys), exc)
            ok = 0
        self._stats.num_spilled_pages += ok
        self._stats.num_l3_written_pages += ok
        self._stats.num_dropped_pages += len(keys) - ok
        return ok

    def stats(self) -> CoreStats:
        return CoreStats(**vars(self._stats))

    def flush(self, deadline_s: float) -> FlushReport:
        report = FlushReport()
        if self._l3 is None:
            return report
        end = time.monotonic() + deadline_s
        keys = [k for k in self._dirty if k in self.host.index]
        for i in range(0, len(keys), 64):
            if time.monotonic() > end:
                report.num_failed += len(keys) - i
                break
            batch = keys[i : i + 64]
            ok = self._put_to_l3(batch, self.host.slots_of(batch))
            report.num_written += ok
            report.num_failed += len(batch) - ok
        self._dirty.clear()
        return report

    def close(self, flush_deadline_s: float | None = None) -> FlushReport:
        report = FlushReport()
        try:
            if flush_deadline_s is not None:
                report = self.flush(flush_deadline_s)
            if self._l3 is not None:
                l3, self._l3 = self._l3, None
                self._l3_call(l3.close())
        finally:
            try:
                if self._runner is not None:
                    self._runner.close()
            finally:
                self.pool.close()
        return report

    def check_integrity(self, quiescent: bool = False) -> None:
        self.host.check_integrity(quiescent)
