"""The daemon's host pools: one per (tenant, layout), all drawing from one memory budget.

A client's Hello names its layout and the daemon names its tenant; the first Hello
of a (tenant, layout) creates that pool (a CacheCore over a HostPool of its own).
Pages of different layouts have different sizes, so each pool keeps its own slots;
what they share is the budget, in bytes:

- every pool's segment is a sparse memfd as large as the whole budget could fill
  (``budget // slot_bytes`` slots, at most MAX_SLOTS_PER_POOL): memory is only taken by slots in use, and a
  freed slot's memory goes back at once (``HostPool.release_memory``), so the
  budget bounds what the pools hold physically. A pool a client pinned for DMA keeps
  its freed slots' memory (unpinning under a live mapping is not safe): it counts every
  slot it ever used (``HostPool.high_water``), and evicting from it frees nothing, so
  only its own stores evict from it;
- before a pool reserves slots (``CacheCore.reserve_up_to``) the registry makes room
  (``admit``): first the tenant's own quota (a tenant over ``l2_pages`` evicts its
  own pages first, from the pool that asks, then its other pools), then the budget:
  while the bytes in use plus the request exceed it, the pool holding the most bytes
  (the asker's request counted as its own) gives up pages, by its own eviction policy.

That is max-min fairness by bytes: a pool below its fair share (budget / pools) is
never evicted for a pool above it, a busy pool can use what idle ones leave free,
and one model's burst cannot flush the others below their share. Pages leased by a
reader are never evicted; when nothing can give way the store gets fewer slots. The
fairness is between pools whose pages can go: a tenant without an ``l2_pages`` quota
that keeps its pages leased holds them (set quotas where tenants do not trust each other).

All cores share one lock (the registry's), taken by the daemon's loop and by each
core's L3 thread, so evicting from another pool while one reserves is safe.

A legacy daemon (``--layout-*`` given, no tenants configured) has one pool, in a
/dev/shm segment of ``host_pool_pages`` slots, exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from controller.config import ConfigError, ControllerConfig
from controller.core import CacheCore
from controller.daemon.l3_tenant import TenantL3, TenantL3Usage
from kvstore.host_pool import HostPool
from kvstore.index.observer import NO_OBSERVERS
from kvstore.layout import KVLayout

log = logging.getLogger("kvstore.daemon")

MAX_POOLS = 64
"""Most (tenant, layout) pools one daemon holds; a Hello past it is refused."""
MAX_POOLS_PER_TENANT = 8
"""Most layouts one tenant may bring (each pool costs the daemon tens of MB of tables)."""
MAX_SLOTS_PER_POOL = 1 << 18
"""Most pages one pool may hold (256K: 4M tokens of 16-token pages). A pool's index and
slot tables are sized by it up front (tens of MB at this bound); real pages are large
(a 2 MiB page: 64 GiB at 32K pages), so only tiny pages meet it before the budget."""


@dataclass(frozen=True)
class TenantQuota:
    """Per-tenant limits (None: none but the budget)."""

    l2_pages: int | None = None
    l3_bytes: int | None = None


@dataclass
class Pool:
    """One (tenant, layout) pool and its counters."""

    tenant: str
    layout: KVLayout
    core: CacheCore
    num_evicted_budget: int = 0
    """Pages this pool gave up so that another pool (or itself) could store."""
    num_evicted_quota: int = 0
    """Pages its tenant's L2 quota made it give up."""

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint()

    @property
    def slot_bytes(self) -> int:
        return self.core.pool.slot_bytes

    @property
    def used_slots(self) -> int:
        pool = self.core.pool
        return pool.num_slots - pool.num_free

    @property
    def used_bytes(self) -> int:
        """The memory this pool holds: its slots in use, or, once it keeps freed slots'
        memory (a client pinned it), every slot it ever used."""
        pool = self.core.pool
        if pool.returns_memory:
            return self.used_slots * self.slot_bytes
        return max(self.used_slots, pool.high_water) * self.slot_bytes

    def new_bytes(self, n: int) -> int:
        """What reserving ``n`` more slots adds to ``used_bytes`` (a pool that keeps its
        memory reuses the slots it freed first: the free list is last in, first out)."""
        pool = self.core.pool
        if pool.returns_memory:
            return n * self.slot_bytes
        return max(0, self.used_slots + n - pool.high_water) * self.slot_bytes

    @property
    def frees_memory(self) -> bool:
        """Whether evicting its pages gives memory back to the budget."""
        return self.core.pool.returns_memory


@dataclass
class _Tenant:
    quota: TenantQuota
    l3: TenantL3Usage = field(default_factory=TenantL3Usage)
    pools: list[Pool] = field(default_factory=list)


class PoolRegistry:
    """The daemon's pools under one budget; see the module docstring."""

    def __init__(self, controller_config: ControllerConfig, budget_bytes: int, *,
                 quotas: Mapping[str, TenantQuota] | None = None,
                 default_quota: TenantQuota = TenantQuota(), fixed_layout: KVLayout | None = None,
                 legacy: bool = False, max_pools: int = MAX_POOLS,
                 observers_for: Callable[[KVLayout], Any] | None = None) -> None:
        """``observers_for``: a layout's CoreObservers (the daemon's KV events), per pool."""
        self.config = controller_config
        self._observers_for = observers_for
        self.budget_bytes = budget_bytes
        self.fixed_layout = fixed_layout
        self.is_legacy = legacy
        self.max_pools = max_pools
        self.lock = threading.RLock()
        self._quotas = dict(quotas or {})
        self._default_quota = default_quota
        self.pools: dict[tuple[str, str], Pool] = {}
        self._by_core: dict[int, Pool] = {}
        self._tenants: dict[str, _Tenant] = {}

    # ---- pools ------------------------------------------------------------------------
    def pool_for(self, tenant: str, layout: KVLayout) -> Pool:
        """The pool of (tenant, layout), created on first use. Raises ConfigError (a
        refusal the client is told) when the layout does not fit or pools are too many."""
        key = (tenant, layout.fingerprint())
        with self.lock:
            found = self.pools.get(key)
            if found is not None:
                return found
            if self.fixed_layout is not None and layout != self.fixed_layout.with_arrangement(
                    layout.arrangement):
                raise ConfigError(f"this daemon serves layout {self.fixed_layout.fingerprint()}, the "
                                  f"client has {layout.fingerprint()}; start a daemon without "
                                  "--layout-* to serve every layout")
            if len(self.pools) >= self.max_pools:
                raise ConfigError(f"this daemon holds {len(self.pools)} pools (tenant, layout), "
                                  "its limit (pools stay until the daemon stops): restart it, "
                                  "or run another daemon for more models")
            if len(self._tenant(tenant).pools) >= MAX_POOLS_PER_TENANT:
                raise ConfigError(f"tenant {tenant} has pools of {MAX_POOLS_PER_TENANT} layouts "
                                  "already, its limit: run another daemon for more models")
            pool = self._create(tenant, layout)
            self.pools[key] = pool
            self._by_core[id(pool.core)] = pool
            self._tenant(tenant).pools.append(pool)
            log.info("pool for tenant %s, layout %s: pages of %d bytes, up to %d pages", tenant,
                     key[1], pool.slot_bytes, pool.core.pool.num_slots)
            return pool

    def _create(self, tenant: str, layout: KVLayout) -> Pool:
        observers = self._observers_for(layout) if self._observers_for else NO_OBSERVERS
        if self.is_legacy:
            core = CacheCore(self.config, layout, observers, lock=self.lock)
            return Pool(tenant, layout, core)
        page_bytes = layout.page_bytes
        num_slots = min(self.budget_bytes // page_bytes, MAX_SLOTS_PER_POOL)
        if num_slots < 1:
            raise ConfigError(f"a page of layout {layout.fingerprint()} takes {page_bytes} bytes, "
                              f"more than the whole host pool budget ({self.budget_bytes} bytes)")
        host = HostPool(layout, num_slots, name=f"kvstore-{_slug(tenant)}-{_slug(layout.fingerprint())}",
                        memfd=True, prefault=False, pin=False)   # pinning would fill it: clients pin
        tenant_state = self._tenant(tenant)
        salt = tenant_salt(tenant)

        def wrap(connector):
            return TenantL3(connector, salt, tenant_state.l3, tenant_state.quota.l3_bytes)

        try:
            core = CacheCore(self._config_of(tenant, layout), layout, observers, pool=host,
                             lock=self.lock, admit=self.admit, wrap_l3=wrap)
        except BaseException:
            host.close()
            raise
        return Pool(tenant, layout, core)

    def _config_of(self, tenant: str, layout: KVLayout) -> ControllerConfig:
        """Each pool opens the L3 store itself; a disk store owns (locks) its directory, so
        each pool gets a subdirectory of it (its ``capacity_bytes`` applies per pool)."""
        l3 = self.config.l3
        if l3.connector != "disk" or "path" not in l3.options:
            return self.config
        path = os.path.join(l3.options["path"], f"{_slug(tenant)}--{_slug(layout.fingerprint())}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        return dataclasses.replace(self.config, l3=dataclasses.replace(
            l3, options={**l3.options, "path": path}))

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(self._quotas.get(tenant, self._default_quota))
        return state

    def quota(self, tenant: str) -> TenantQuota:
        return self._tenant(tenant).quota

    # ---- the budget -------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(p.used_bytes for p in self.pools.values())

    def admit(self, core: CacheCore, n: int) -> int:
        """Make room for ``n`` slots of ``core``'s pool (quota, then budget; module doc);
        how many it may reserve now. Called under ``lock`` (the cores share it)."""
        with self.lock:
            pool = self._by_core[id(core)]
            n = self._within_quota(pool, n)
            return self._within_budget(pool, n)

    def _within_quota(self, pool: Pool, n: int) -> int:
        tenant = self._tenants[pool.tenant]
        limit = tenant.quota.l2_pages
        if limit is None:
            return n
        over = sum(p.used_slots for p in tenant.pools) + n - limit
        # Its own pages go first: the asking pool, then its tenant's largest others.
        for victim in [pool, *sorted((p for p in tenant.pools if p is not pool),
                                     key=lambda p: -p.used_bytes)]:
            if over <= 0:
                break
            freed = victim.core.host.evict(over)
            victim.num_evicted_quota += freed
            over -= freed
        return max(0, n - max(over, 0))

    def _within_budget(self, pool: Pool, n: int) -> int:
        stuck: set[int] = set()
        while True:
            need = pool.new_bytes(n)
            free = self.budget_bytes - self.used_bytes
            if need <= free:
                return n
            # The pool holding the most bytes (the asker's request counted as its own).
            # A pool that keeps its memory gives none back by evicting: only the asker
            # evicts from it (its own freed slots are reused without new memory).
            def held(p: Pool) -> int:
                return p.used_bytes + (need if p is pool else 0)
            ranked = sorted((p for p in self.pools.values()
                             if id(p) not in stuck and (p.frees_memory or p is pool)),
                            key=held, reverse=True)
            if not ranked:
                reusable = n - pool.new_bytes(n) // pool.slot_bytes
                return max(0, reusable + free // pool.slot_bytes)
            victim = ranked[0]
            # Evict down towards the next largest, in one batch (never below it: that
            # would swap which pool is over its share).
            gap = held(victim) - (held(ranked[1]) if len(ranked) > 1 else 0)
            want = max(1, -(-min(need - free, max(gap, victim.slot_bytes)) // victim.slot_bytes))
            freed = victim.core.host.evict(want)
            if not freed:
                stuck.add(id(victim))   # all leased or being written: ask the next one
                continue
            victim.num_evicted_budget += freed

    # ---- state ------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """One entry per pool, for GetStats and the metrics."""
        out = []
        with self.lock:
            for pool in self.pools.values():
                stats = pool.core.stats()
                out.append({"tenant": pool.tenant, "layout": pool.fingerprint,
                            "slot_bytes": pool.slot_bytes, "num_slots": pool.core.pool.num_slots,
                            "used_slots": pool.used_slots, "cached_pages": stats.num_l2_pages,
                            "evicted_budget": pool.num_evicted_budget,
                            "evicted_quota": pool.num_evicted_quota,
                            "stored_pages": stats.num_stored_pages,
                            "l3_bytes_written": stats.l3_bytes_written})
        return out

    def tenants(self) -> dict[str, dict[str, Any]]:
        """Per tenant: L2 pages and bytes in use, quotas, L3 bytes held as far as known."""
        with self.lock:
            return {name: {"l2_pages": sum(p.used_slots for p in t.pools),
                           "l2_bytes": sum(p.used_bytes for p in t.pools),
                           "l2_quota_pages": t.quota.l2_pages or 0,
                           "l3_bytes": t.l3.num_bytes, "l3_quota_bytes": t.quota.l3_bytes or 0,
                           "l3_refused_pages": t.l3.num_refused,
                           "pools": len(t.pools)} for name, t in self._tenants.items()}

    def close(self, flush_deadline_s: float | None) -> list:
        """Close every core (flush to L3 within the deadline, each); their reports."""
        reports = []
        for pool in list(self.pools.values()):
            try:
                reports.append(pool.core.close(flush_deadline_s))
            except Exception:  # noqa: BLE001 - the other pools must still close
                log.exception("closing the pool of %s %s failed", pool.tenant, pool.fingerprint)
        self.pools.clear()
        self._by_core.clear()
        return reports


def tenant_salt(tenant: str) -> bytes:
    """The key salt of a tenant's L3 pages (stable across restarts, so L3 stays usable)."""
    return hashlib.blake2b(tenant.encode(), digest_size=32, person=b"kvstore-tenant").digest()


def _slug(text: str) -> str:
    """A file-name-safe name of ``text``, distinct for distinct texts (a digest suffix)."""
    digest = hashlib.blake2b(text.encode(), digest_size=4).hexdigest()
    return "".join(c if c.isalnum() else "-" for c in text)[:48] + "-" + digest


def merge_reports(reports: list) -> Any:
    """One FlushReport of several (what the daemon logs at shutdown)."""
    from controller.core import FlushReport

    reports = [r for r in reports if r is not None]
    return FlushReport(sum(r.num_written for r in reports), sum(r.num_failed for r in reports)) \
        if reports else None


