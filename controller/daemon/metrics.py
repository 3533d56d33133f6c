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
        r = self.registry = CollectorRegistry(auto_describe=True)
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
        self._server = None

    def observe_lookup(self, num_keys: int, num_l2: int, num_l3: int, page_bytes: int,
                       seconds: float) -> None:
        self.lookups.inc()
        self.lookup_seconds.observe(seconds)
        for tier, n in (("l2", num_l2), ("l3", num_l3), ("miss", num_keys - num_l2 - num_l3)):
            if n:
                self.lookup_pages[tier].inc(n)
                self.lookup_bytes[tier].inc(n * page_bytes)
        if num_l3:
            self.l3_fetch_seconds.observe(seconds)

    def refresh_core(self, stats: dict, free: int, reserved: int, total: int) -> None:
        for name, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.core.labels(name).set(value)
        self.slots.labels("free").set(free)
        self.slots.labels("reserved").set(reserved)
        self.slots.labels("ready").set(total - free - reserved)

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
