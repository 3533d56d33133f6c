"""DaemonLink: a session, its heartbeat and the mapped segment; the requests every
daemon-backed handle shares (lookup with the prefetch policy, release, stats)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

from controller.api import CacheError, CacheStats
from controller.client.channel import Credentials
from controller.client.mapped_pool import MappedPool
from controller.client.session import Heartbeat, Session
from controller.client_choice import ClientChoice
from controller.config import PrefetchConfig
from controller.daemon import protocol as p
from controller.liveness import LinkHealth
from kvstore.layout import KVLayout

log = logging.getLogger("controller.client")   # one logger for the client package (and liveness)


class DaemonLink:
    """An attached session with the daemon's segment mapped, kept alive by heartbeats:
    what every daemon-backed handle needs (DaemonClient; the engine adapters' keyed
    cache). Knows no device pool. Not thread-safe.

    ``on_remap`` runs when the session was lost (daemon restart, client reaped) and
    the segment is mapped anew: whatever the handle held of the old one is gone."""

    def __init__(self, address: str, layout: KVLayout, *, credentials: Credentials = Credentials(),
                 request_timeout_s: float = 10.0, client_name: str | None = None, pin: bool = False,
                 prefetch: PrefetchConfig = PrefetchConfig(),
                 on_remap: Callable[[], None] = lambda: None) -> None:
        self.layout = layout
        self.prefetch_config = prefetch
        self.choice = ClientChoice(prefetch, layout.page_size, layout.page_bytes)
        self.session = Session(address, layout.fingerprint(), credentials=credentials,
                               request_timeout_s=request_timeout_s, client_name=client_name,
                               layout=layout, pins_memory=pin)
        self.pool: MappedPool | None = None
        self._pool_epoch = -1
        self._pin = pin
        self._on_remap = on_remap
        try:
            self.session.attach()
            self.ensure_mapped()
        except BaseException:
            self.session.close()
            raise
        self._heartbeat = Heartbeat(self.session)
        self._heartbeat.start()

    @property
    def epoch(self) -> int:
        """Changes whenever the session was opened anew (a lease of another epoch is gone)."""
        return self.session.epoch

    def ensure_mapped(self) -> None:
        """Map the current instance's segment; tell the handle when the old one is gone."""
        s = self.session
        if s.hello is None:
            s.attach()
        if self._pool_epoch == s.epoch and self.pool is not None:
            return
        self._on_remap()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.pool = MappedPool(s.hello, self.layout, pin=self._pin)
        self._pool_epoch = s.epoch

    def call(self, msg: p.Message, timeout_s: float | None = None) -> p.Message:
        reply = self.session.call(msg, timeout_s)
        self.ensure_mapped()
        if type(reply) in (p.LookupReply, p.StorePlanReply) and reply.slots:
            self.pool.prepare_slots(reply.slots)   # slots a device copy will name
        return reply

    def require_fresh(self) -> None:
        """Raise unless the daemon surely still holds this session's leases and reservations.

        The daemon reclaims a session ``lease_ttl_s`` after the last request it got; the
        send time of the latest answered request is a lower bound of that."""
        s = self.session
        if s.hello is None or self._pool_epoch != s.epoch:
            raise CacheError("the daemon lost this client's session; lookup() again")
        if time.monotonic() - s.last_ack_sent > s.hello.lease_ttl_s / 2:
            epoch = s.epoch
            reply = s.call(p.Heartbeat(), timeout_s=s.hello.lease_ttl_s / 4)
            if type(reply) is not p.OkReply or s.epoch != epoch or s.hello is None:
                raise CacheError("this client's leases were reclaimed by the daemon; lookup() again")

    # ---- requests shared by the handles ---------------------------------------------------
    def lookup(self, keys: list[bytes], num_tokens: int) -> p.LookupReply:
        """Lease the cached prefix of ``keys``, waiting on the daemon's prefetch of L3
        pages as ``prefetch_config.policy`` says. Raises DaemonUnavailable, CacheError."""
        reply = self._lookup_once(keys, start_prefetch=True)
        epoch = self.session.epoch   # the session reply's lease belongs to
        if reply.num_pending:
            self.choice.refresh(self.call)   # the L3 rates a wait plans with (hits: at release)
        if reply.num_pending and self._wait_for_prefetch(reply, num_tokens):
            # Look again for what arrived (counted with the first as one lookup); the
            # first lease ends once the second holds.
            again = self._lookup_once(keys, start_prefetch=False, follows=reply.prefetch_id)
            if self.session.epoch == epoch:   # else it went with the old session, and its
                self.release_lease(reply.lease_id)   # id may name a lease of the new one
            num_l2 = min(reply.num_l2, again.num_l2 + again.num_l3)
            reply = dataclasses.replace(again, num_l2=num_l2,
                                        num_l3=again.num_l2 + again.num_l3 - num_l2)
        chosen = self.choice.choose(reply, num_tokens)   # auto may keep fewer pages
        if chosen.lease_id and not chosen.num_l2 + chosen.num_l3:
            self.release_lease(chosen.lease_id)
            chosen = dataclasses.replace(chosen, lease_id=0)
        return chosen

    def _lookup_once(self, keys: list[bytes], start_prefetch: bool, follows: int = 0) -> p.LookupReply:
        reply = self.call(p.Lookup(p.join_keys(keys), start_prefetch, follows))
        if type(reply) is p.ErrorReply:
            raise CacheError(f"lookup refused by the daemon: {reply.code}: {reply.message}")
        if type(reply) is not p.LookupReply or reply.num_l2 + reply.num_l3 > len(keys) \
                or len(reply.slots) != 4 * (reply.num_l2 + reply.num_l3):
            raise CacheError("the daemon's lookup reply does not match the request")
        return reply

    def _wait_for_prefetch(self, reply: p.LookupReply, num_tokens: int) -> bool:
        """Wait on a prefetch as the policy says; whether to look up again."""
        cfg, prefetch_id = self.prefetch_config, reply.prefetch_id
        if cfg.policy == "best_effort" or not prefetch_id:
            return False
        if cfg.policy == "auto":
            return self.choice.wait(reply, num_tokens, self.call_prefetch, self.session.request_timeout_s)
        budget = (self.session.request_timeout_s if cfg.policy != "timeout" else
                  cfg.timeout_base_s + cfg.timeout_per_1k_tokens_s * num_tokens / 1000)
        reply = self.call_prefetch(p.WaitPrefetch(prefetch_id, budget), budget)
        return type(reply) is p.PrefetchReply and reply.num_ready > 0

    def call_prefetch(self, msg: p.Message, wait_s: float = 0.0) -> p.Message:
        """A prefetch request, whose answer may take ``wait_s`` on top of the usual deadline."""
        return self.session.call(msg, timeout_s=wait_s + self.session.request_timeout_s)

    def release_lease(self, daemon_lease_id: int) -> None:
        if not daemon_lease_id:
            return
        self.choice.refresh(self.call)   # counts and rates, once a second, off the TTFT path
        # Not waited for: a release has nothing to answer, and the daemon serves this
        # session's next request after it (a daemon that is gone reclaims it with the session).
        self.session.send_only(p.Release(daemon_lease_id))

    def abort_store(self, reservation_id: int) -> None:
        try:
            self.session.call(p.AbortStore(reservation_id))
        except CacheError:
            pass  # the daemon aborts it after reservation_ttl_s, or has restarted

    @property
    def health(self) -> LinkHealth:
        """Whether the daemon answers this client, and its outages so far."""
        return self.session.watch.health()

    def daemon_stats(self) -> dict:
        reply = self.call(p.GetStats())
        if type(reply) is not p.StatsReply:
            raise CacheError(f"stats refused: {reply}")
        return reply.stats

    def cache_stats(self) -> CacheStats:
        """The daemon's cache counters (shared by every client of the daemon), this
        client's counts of what its lookups handed out sent first."""
        self.choice.refresh(self.call, force=True)
        raw = self.daemon_stats()
        return CacheStats(**{f.name: type(f.default)(raw.get(f.name, 0))
                             for f in dataclasses.fields(CacheStats)})

    def check_integrity(self, quiescent: bool = False) -> None:
        """Run the daemon's integrity check; raises CacheError with its finding."""
        reply = self.call(p.CheckIntegrity(quiescent))
        if type(reply) is not p.OkReply:
            raise CacheError(f"daemon integrity check failed: {reply.message}")

    def close(self) -> None:
        """Say Goodbye (the daemon ends every lease), stop the heartbeat, unmap. Idempotent."""
        try:   # the last counts; a daemon that is gone gets a short try
            self.choice.send_counts(lambda msg: self.session.call(msg, timeout_s=1.0))
        except CacheError as exc:
            log.info("counts of the last lookups not sent: %s", exc)
        self._heartbeat.stop_event.set()
        self._heartbeat.join(timeout=5)
        try:
            self.session.close()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None
