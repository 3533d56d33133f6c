"""DaemonClient: the CacheClient API over a DaemonLink and the engine's device pool."""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
import torch

from controller.api import (CacheClient, CacheError, CacheStats, LoadError, LoadHandle,
                            LookupResult, PrefetchTicket, StoreResult)
from controller.arguments import page_id_list, token_array
from controller.client.channel import Credentials
from controller.client.lease import Lease, Reserved
from controller.client.link import DaemonLink
from controller.client.prefetch_ticket import RemotePrefetch
from controller.config import PrefetchConfig
from controller.daemon import protocol as p
from controller.device_pool import DevicePool
from controller.liveness import DaemonUnavailable, LinkHealth
from controller.load_handle import CompletedLoad
from controller.pending_stores import PendingStore, PendingStores
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, PageKeyCache
from kvstore.slot_fence import SlotFence

log = logging.getLogger("controller.client")   # one logger for the client package (and liveness)


class DaemonClient(CacheClient):
    """An engine's handle on a daemon's cache; same contract as the embedded controller."""

    def __init__(self, address: str, namespace: KeyNamespace, device_pool: torch.Tensor, *,
                 copy_backend: str | None = None, credentials: Credentials = Credentials(),
                 request_timeout_s: float = 10.0, client_name: str | None = None,
                 prefetch: PrefetchConfig = PrefetchConfig()) -> None:
        self.layout: KVLayout = namespace.layout
        self._device = DevicePool(self.layout, device_pool, copy_backend)
        self._ns_digest = namespace.digest()
        # A next turn resends the last prompt: only its new pages are hashed.
        self._key_cache = PageKeyCache(self.layout.page_size)
        self._leases: dict[int, Lease] = {}   # this client's lease id -> lease
        self._lost_lease_ids: set[int] = set()
        self._pending = PendingStores(self._publish,
                                      lambda store: self._link.abort_store(store.plan.reservation_id))
        self._lease_ids = itertools.count(1)
        self._is_closed = False
        self._link = DaemonLink(address, self.layout, credentials=credentials,
                                request_timeout_s=request_timeout_s, client_name=client_name,
                                pin=device_pool.is_cuda, prefetch=prefetch,
                                on_remap=self._drop_leases)

    def _check_open(self) -> None:
        if self._is_closed:
            raise CacheError("this cache client is closed; connect again")

    def _drop_leases(self, reason: str = "the daemon lost this client's session") -> None:
        """The daemon dropped them with the session: loads of them end too, and their
        waits raise LoadError (the engine recomputes)."""
        for lease in self._leases.values():
            for handle in lease.loads:
                handle.abandon(reason)
        # Remembered (ids only, until released) so load() can tell "lost" from "released".
        self._lost_lease_ids.update(self._leases)
        self._leases.clear()

    def _keys(self, tokens) -> list[bytes]:
        return self._key_cache.keys(self._ns_digest, token_array(tokens))

    # ---- the API ------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        self._check_open()
        keys = self._keys(tokens)
        P = self.layout.page_size
        if not keys:
            return LookupResult(0, (), P, 0, 0)
        self._pending.publish_done(wanted=keys)
        try:
            reply = self._link.lookup(keys, len(keys) * P)
        except DaemonUnavailable as exc:
            log.debug("lookup is a miss: %s", exc)  # DaemonWatch logs the outage once
            return LookupResult(0, (), P, 0, 0)
        num_hit = reply.num_l2 + reply.num_l3
        # The result carries an id of this client's own: a restarted daemon numbers its
        # leases from 1 again, and an old result must never name a new lease.
        local_id = next(self._lease_ids) if reply.lease_id else 0
        result = LookupResult(local_id, tuple(keys[:num_hit]), P, reply.num_l2, reply.num_l3,
                              reply.num_pending)
        if reply.lease_id:
            self._leases[local_id] = Lease(result, p.unpack_u32(reply.slots), reply.generations,
                                            self._link.epoch, [], reply.lease_id)
        return result

    def report_prefill(self, num_tokens: int, num_cached: int, seconds: float,
                       load_wait_s: float = 0.0) -> None:
        cost = self._link.choice.cost
        cost.observe_prefill(num_tokens, num_cached, seconds)
        if num_cached:
            cost.observe_l2_load(num_cached // self.layout.page_size * self.layout.page_bytes, load_wait_s)

    def prefetch(self, tokens: Sequence[int] | np.ndarray) -> PrefetchTicket:
        self._check_open()
        keys = self._keys(tokens)
        try:
            reply = self._link.call_prefetch(p.StartPrefetch(p.join_keys(keys))) if keys else None
        except DaemonUnavailable as exc:
            log.debug("prefetch not started: %s", exc)
            reply = None
        if type(reply) is p.ErrorReply:
            raise CacheError(f"prefetch refused by the daemon: {reply.code}: {reply.message}")
        return RemotePrefetch(self._link, reply if type(reply) is p.PrefetchReply else None)

    def load(self, result: LookupResult, device_pages: Sequence[int]) -> LoadHandle:
        self._check_open()
        device_pages = page_id_list(device_pages, "load() device_pages")
        if len(device_pages) != result.num_hit_pages:
            raise CacheError(f"load() needs one device page per hit page: got {len(device_pages)} "
                             f"for {result.num_hit_pages} hit pages")
        if not result.num_hit_pages:
            return CompletedLoad(self.layout.num_layers)
        self._pending.publish_done()
        pages = self._device.check_pages(device_pages, "device_pages")
        try:
            self._link.require_fresh()
        except CacheError as exc:
            # The session was lost (and this lease with it): the engine recomputes.
            raise LoadError(f"load() of lease {result.lease_id} failed: {exc}",
                            range(result.num_hit_pages)) from None
        lease = self._leases.get(result.lease_id)
        if lease is None and result.lease_id in self._lost_lease_ids:
            raise LoadError(f"lease {result.lease_id} was lost with the daemon session (daemon "
                            "restarted, or this client was silent): recompute its pages",
                            range(result.num_hit_pages))
        if lease is None or lease.result != result or lease.epoch != self._link.epoch:
            raise CacheError(f"lease {result.lease_id} has ended (released): lookup() again "
                             "before load()")
        pool = self._link.pool
        fence = SlotFence(pool.generations, lease.slots, np.frombuffer(lease.generations, "<u4"))
        handle = self._device.load(pool, lease.slots, pages, fence)
        lease.loads.append(handle)
        return handle

    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int]) -> StoreResult:
        """See ``CacheClient.store``. On CUDA this returns once the device-to-host copy is
        enqueued (the engine may reuse its pages at once: ``DevicePool.start_save``); the
        pages are committed by a later call that finds the copy complete, or by close.
        ``num_new_pages`` then counts the pages being written."""
        self._check_open()
        self._pending.publish_done()
        keys = self._keys(tokens)
        device_pages = page_id_list(device_pages, "store() device_pages")
        if len(device_pages) < len(keys):
            raise CacheError(f"store() got {len(device_pages)} device pages for {len(keys)} full "
                             "pages of tokens")
        if not keys:
            return StoreResult(0, 0, 0)
        pages = self._device.check_pages(device_pages[: len(keys)], "device_pages")
        try:
            plan = self._link.call(p.BeginStore(p.join_keys(keys)))
        except DaemonUnavailable as exc:
            log.debug("store skipped: %s", exc)
            return StoreResult(len(keys), 0, len(keys))
        if type(plan) is p.ErrorReply:
            raise CacheError(f"store refused by the daemon: {plan.code}: {plan.message}")
        if not plan.reservation_id:
            return StoreResult(len(keys), 0, plan.num_skipped)
        positions, slots = p.unpack_u32(plan.positions), p.unpack_u32(plan.slots)
        try:
            if len(positions) != len(slots) or len(plan.generations) != 4 * len(slots) \
                    or max(positions) >= len(keys):
                raise CacheError("the daemon's store plan does not match the request")
            self._link.require_fresh()
            pool = self._link.pool
            fence = SlotFence(pool.generations, slots, np.frombuffer(plan.generations, "<u4"))
            copy = self._device.start_save([pages[i] for i in positions], pool, slots)
        except DaemonUnavailable:  # went down meanwhile: fail open, the store is skipped
            return StoreResult(len(keys), 0, len(keys))
        except BaseException:
            self._link.abort_store(plan.reservation_id)
            raise
        store = PendingStore(keys, Reserved(plan.reservation_id, fence, plan.num_skipped), copy)
        if not copy.is_done():
            # CUDA: the copy runs behind this call; published by a later call once done.
            self._pending.add(store)
            return StoreResult(len(keys), len(slots), plan.num_skipped)
        num_published = self._publish(store)
        if num_published is None:
            return StoreResult(len(keys), 0, len(keys) - plan.num_skipped)
        return StoreResult(len(keys), num_published, plan.num_skipped)

    def _publish(self, store: PendingStore) -> int | None:
        """Commit a store whose copy has completed; the pages published, or None if it
        could not be (its slots changed owner, the daemon refused or did not answer)."""
        reserved = store.plan
        if not self._owns_slots(reserved.fence):
            self._link.abort_store(reserved.reservation_id)
            return None
        try:
            reply = self._link.session.call(p.CommitStore(reserved.reservation_id))
        except DaemonUnavailable as exc:
            log.debug("store not published: %s", exc)  # DaemonWatch logs the outage once
            return None
        if type(reply) is not p.CommitReply:
            log.warning("store not published: %s", getattr(reply, "message", reply))
            return None
        return reply.num_published

    @staticmethod
    def _owns_slots(fence: SlotFence) -> bool:
        """After a store's copy: whether every reserved slot is still this client's. The
        daemon keeps a live writer's slots, so this fails only past an orphan quarantine."""
        bad = fence.bad_positions()
        if bad:
            log.error("store skipped: %d reserved slot(s) were given to another writer while this "
                      "client was silent past orphan_quarantine_s; nothing is published", len(bad))
        return not bad

    def release(self, result: LookupResult) -> None:
        self._check_open()
        lease = self._leases.get(result.lease_id)
        if lease is None:
            self._lost_lease_ids.discard(result.lease_id)
            return
        if lease.result != result:
            raise CacheError(f"release() got a result that is not lease {result.lease_id} of this cache")
        del self._leases[result.lease_id]
        for handle in lease.loads:
            handle.finish()  # copies out of the slots must be over before the lease ends
        if lease.epoch == self._link.epoch:
            self._link.release_lease(lease.daemon_lease_id)

    def stats(self) -> CacheStats:
        """The daemon's cache counters (shared by every client of the daemon)."""
        self._check_open()
        self._pending.publish_done()
        return self._link.cache_stats()

    def daemon_stats(self) -> dict:
        self._check_open()
        self._pending.publish_done()
        return self._link.daemon_stats()

    def link_health(self) -> LinkHealth:
        """This client's view of the daemon: up or down, outages, requests failed fast.
        Answered locally (``stats()`` asks the daemon, and fails fast while it is down)."""
        self._check_open()
        return self._link.health

    @property
    def num_pending_stores(self) -> int:
        """Stores whose copies were in flight at the last call (not yet visible)."""
        return len(self._pending)

    def check_integrity(self, quiescent: bool = False) -> None:
        """Run the daemon's integrity check (after the stores in flight, when ``quiescent``);
        raises CacheError with its finding."""
        self._check_open()
        self._pending.publish_done(wait=quiescent)
        self._link.check_integrity(quiescent)

    def close(self) -> None:
        """Publish the stores in flight, release every lease (Goodbye), stop the heartbeat,
        unmap the segment. Idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            self._pending.publish_done(wait=True)
        finally:
            self._drop_leases()
            self._link.close()
