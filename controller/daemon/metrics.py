"""Prometheus metrics of one daemon, in a registry of its own.

The daemon's loop thread updates everything here; the HTTP endpoint
(``--metrics-port``, prometheus_client's server thread) only reads. Gauges that
mirror the cache's state are refreshed by the loop once per tick, so the
endpoint never calls into the (single-threaded) cache.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0)
_L3_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
TIERS = ("l2", "l3", "miss")


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._add_lookup_metrics(self.registry)
        self._add_request_metrics(self.registry)
        self._add_state_gauges(self.registry)
        self._add_l3_gauges(self.registry)
        self._add_pool_gauges(self.registry)
        self._server = None

    def _add_lookup_metrics(self, r: CollectorRegistry) -> None:
        pages = Counter("kvstore_lookup_pages", "Pages asked for by lookups, by the tier that served "
                        "them (miss: no tier)", ["tier"], registry=r)
        nbytes = Counter("kvstore_lookup_bytes", "Bytes of looked-up pages, by serving tier",
                         ["tier"], registry=r)
        self.lookup_pages = {t: pages.labels(t) for t in TIERS}
        self.lookup_bytes = {t: nbytes.labels(t) for t in TIERS}
        self.lookups = Counter("kvstore_lookups", "Lookup requests served", registry=r)
        self.lookup_seconds = Histogram("kvstore_lookup_seconds", "Daemon-side time of one lookup",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.l3_fetch_seconds = Histogram(
            "kvstore_l3_fetch_seconds", "Time of lookups that read pages up from L3",
            buckets=_L3_BUCKETS, registry=r)
        self.flush_seconds = Histogram("kvstore_l3_flush_seconds", "Time of write-back flushes to L3",
                                       buckets=_L3_BUCKETS, registry=r)

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Requests by type and outcome, refusals, and what fencing reclaimed."""
        stored = Counter("kvstore_store_pages", "Pages offered to store, by outcome", ["outcome"],
                         registry=r)
        self.store_pages = {o: stored.labels(o) for o in ("published", "skipped", "aborted")}
        self.requests = Counter("kvstore_requests", "Requests served, by message type", ["type"],
                                registry=r)
        self.bad_messages = Counter("kvstore_bad_messages", "Frames refused as malformed or oversized",
                                    ["code"], registry=r)
        self.refused = Counter("kvstore_refused_connections",
                               "Clients refused: bad credentials, unknown session, wrong layout",
                               ["reason"], registry=r)
        self.reaped_clients = Counter("kvstore_reaped_clients",
                                      "Sessions ended without Goodbye: process gone, or silent and "
                                      "unwatched", registry=r)
        self.reclaimed = Counter("kvstore_reclaimed", "Leases and reservations reclaimed from "
                                 "clients whose process is gone or whose quarantine ended",
                                 ["kind"], registry=r)
        self.fence_events = Counter("kvstore_fence_events", "Slot fencing: clients suspended (silent, "
                                    "process alive), resumed, orphaned (silent, unwatched: slots "
                                    "quarantined), reservations overdue", ["event"], registry=r)

    def _add_state_gauges(self, r: CollectorRegistry) -> None:
        self.suspended = Gauge("kvstore_suspended_clients", "Silent clients whose process lives: their "
                               "slots are kept", registry=r)
        self.quarantined = Gauge("kvstore_quarantined_slots", "Slots of orphaned sessions kept out of use",
                                 registry=r)
        self.clients = Gauge("kvstore_clients", "Open client sessions", registry=r)
        self.leases = Gauge("kvstore_leases", "Open leases", registry=r)
        self.reservations = Gauge("kvstore_reservations", "Open store reservations", registry=r)
        self.slots = Gauge("kvstore_pool_slots", "Host pool slots by state", ["state"], registry=r)
        self.core = Gauge("kvstore_cache_counter", "Counters of the cache core (CacheStats fields: "
                          "hits per tier, evictions, L3 errors, pages written/dropped)", ["name"],
                          registry=r)

    def _add_l3_gauges(self, r: CollectorRegistry) -> None:
        self.l3_up = Gauge("kvstore_l3_up", "1 while L3 reads and writes work, 0 while either "
                           "fails (see kvstore status for the last error)", registry=r)
        self.l3_failing_since = Gauge("kvstore_l3_failing_since_seconds", "Unix time L3 began "
                                      "failing; 0 while it works", registry=r)
        l3_errors = Gauge("kvstore_l3_errors", "L3 errors since start, by direction (a failed "
                          "call, or a page a write could not store, e.g. disk full)", ["direction"],
                          registry=r)
        self.l3_errors = {d: l3_errors.labels(d) for d in ("read", "write")}

    def _add_pool_gauges(self, r: CollectorRegistry) -> None:
        self.budget = Gauge("kvstore_pool_budget_bytes", "Host memory budget all pools share, and "
                            "what they hold", ["kind"], registry=r)
        self.pool_pages = Gauge("kvstore_pool_pages", "Pages of each (tenant, layout) pool: used "
                                "slots, and pages evicted for the budget or the tenant's quota",
                                ["tenant", "layout", "kind"], registry=r)
        self.tenant = Gauge("kvstore_tenant", "Per tenant: L2 pages and bytes held, L3 bytes "
                            "written and not seen gone, quotas (0: none), L3 pages refused by "
                            "the quota", ["tenant", "kind"], registry=r)

    def refresh_pools(self, budget: int, used: int, pools: list[dict], tenants: dict) -> None:
        self.budget.labels("budget").set(budget)
        self.budget.labels("used").set(used)
        for pool in pools:
            for kind, key in (("used", "used_slots"), ("evicted_budget", "evicted_budget"),
                              ("evicted_quota", "evicted_quota")):
                self.pool_pages.labels(pool["tenant"], pool["layout"], kind).set(pool[key])
        for name, t in tenants.items():
            for kind in ("l2_pages", "l2_bytes", "l2_quota_pages", "l3_bytes", "l3_quota_bytes",
                         "l3_refused_pages"):
                self.tenant.labels(name, kind).set(t[kind])

    def refresh_core(self, stats: dict, free: int, reserved: int, total: int) -> None:
        for name, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.core.labels(name).set(value)
        self.slots.labels("free").set(free)
        self.slots.labels("reserved").set(reserved)
        self.slots.labels("ready").set(total - free - reserved)

    def refresh_l3(self, health) -> None:
        """Mirror the L3 store's HealthSnapshot (None: no L3, reported as up)."""
        self.l3_up.set(1 if health is None or health.is_ok else 0)
        self.l3_failing_since.set(0 if health is None or health.failing_since is None
                                  else health.failing_since)
        self.l3_errors["read"].set(health.num_read_errors if health is not None else 0)
        self.l3_errors["write"].set(health.num_write_errors if health is not None else 0)

    def serve(self, host: str, port: int) -> None:
        """Start the text endpoint on a thread of prometheus_client's."""
        result = start_http_server(port, addr=host, registry=self.registry)
        self._server = result[0] if isinstance(result, tuple) else None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def l3_health_fields(health) -> dict:
    """The L3 store's HealthSnapshot as flat stats entries (for GetStats and kvstore status)."""
    if health is None:
        return {"l3_status": "none"}
    return {"l3_status": health.status, "l3_failing_since": health.failing_since or 0.0,
            "l3_last_error": health.last_error[:300], "l3_last_error_at": health.last_error_at or 0.0,
            "l3_read_errors": health.num_read_errors, "l3_write_errors": health.num_write_errors}
