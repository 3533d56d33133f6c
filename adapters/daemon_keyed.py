"""DaemonKeyedCache: ``KeyedCache`` against a ``kvstore serve`` daemon.

The daemon's wire protocol is key-level already, so this is a thin layer over
``controller.client.DaemonLink`` (session, heartbeats, deadlines, re-attach, the
mapped segment)::

    lookup_keys       -> Lookup (+ WaitPrefetch, Lookup again)   the daemon's prefetch policy
    release_keys      -> Release
    begin_store_keys  -> BeginStore        commit_store_keys -> CommitStore
    abort_store_keys  -> AbortStore        host_tensor       =  the mapped segment
    check_fresh       =  DaemonLink.require_fresh (leases of a silent client are reclaimed)

Engines call their plug-ins from several threads; one lock orders the calls on
the link (a zmq socket is not thread-safe). Leases and reservations carry the
link's epoch: after a daemon restart the old ones are gone (release is a no-op,
commit raises CacheError).
"""

from __future__ import annotations

import itertools
import threading
from typing import Sequence

import torch

from adapters.keyed_api import KeyedCache, KeyedLease, KeyedReservation
from controller.api import CacheError, CacheStats
from controller.client import DaemonLink, DaemonUnavailable
from controller.daemon import protocol as p
from kvstore.layout import KVLayout
from kvstore.page_keys import PageKey


class DaemonKeyedCache(KeyedCache):
    def __init__(self, address: str, layout: KVLayout, *, request_timeout_s: float = 10.0,
                 client_name: str = "kvstore-adapter") -> None:
        self.layout = layout.with_arrangement("page_first")
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # local id -> (epoch, daemon id) for leases and reservations
        self._leases: dict[int, tuple[int, int]] = {}
        self._reservations: dict[int, tuple[int, int]] = {}
        self._is_closed = False
        self._link = DaemonLink(address, self.layout, request_timeout_s=request_timeout_s,
                                client_name=client_name, pin=torch.cuda.is_available(),
                                on_remap=self._forget_all)

    def _forget_all(self) -> None:
        self._leases.clear()
        self._reservations.clear()

    def _check_open(self) -> None:
        if self._is_closed:
            raise CacheError("this cache handle is closed; open_keyed_cache() again")

    @property
    def host_tensor(self) -> torch.Tensor:
        self._check_open()
        return self._link.pool.tensor

    @property
    def generations(self):
        return self._link.pool.generations

    def lookup_keys(self, keys: Sequence[PageKey]) -> KeyedLease:
        keys = list(keys)
        with self._lock:
            self._check_open()
            if not keys:
                return KeyedLease(0, (), (), 0, 0)
            try:
                reply = self._link.lookup(keys, len(keys) * self.layout.page_size)
            except DaemonUnavailable:
                return KeyedLease(0, (), (), 0, 0)   # a daemon that does not answer: a miss
            num_hit = reply.num_l2 + reply.num_l3
            local_id = next(self._ids) if reply.lease_id else 0
            if reply.lease_id:
                self._leases[local_id] = (self._link.epoch, reply.lease_id)
            return KeyedLease(local_id, tuple(keys[:num_hit]), tuple(p.unpack_u32(reply.slots)),
                              reply.num_l2, reply.num_l3, tuple(p.unpack_u32(reply.generations)))

    def release_keys(self, lease: KeyedLease) -> None:
        with self._lock:
            held = self._leases.pop(lease.lease_id, None)
            if held is not None and held[0] == self._link.epoch and not self._is_closed:
                self._link.release_lease(held[1])

    def begin_store_keys(self, keys: Sequence[PageKey]) -> KeyedReservation:
        keys = tuple(keys)
        with self._lock:
            self._check_open()
            if not keys:
                return KeyedReservation(0, keys, (), (), 0)
            try:
                plan = self._link.call(p.BeginStore(p.join_keys(list(keys))))
            except DaemonUnavailable:
                return KeyedReservation(0, keys, (), (), len(keys))
            if type(plan) is not p.StorePlanReply:
                raise CacheError(f"store refused by the daemon: {getattr(plan, 'message', plan)}")
            positions, slots = p.unpack_u32(plan.positions), p.unpack_u32(plan.slots)
            generations = p.unpack_u32(plan.generations)
            if len(positions) != len(slots) or len(generations) != len(slots) \
                    or any(i >= len(keys) for i in positions):
                raise CacheError("the daemon's store plan does not match the request")
            local_id = next(self._ids) if plan.reservation_id else 0
            if plan.reservation_id:
                self._reservations[local_id] = (self._link.epoch, plan.reservation_id)
            return KeyedReservation(local_id, keys, tuple(positions), tuple(slots), plan.num_skipped,
                                    tuple(generations))

    def commit_store_keys(self, reservation: KeyedReservation) -> int:
        with self._lock:
            self._check_open()
            if not reservation.reservation_id:
                return 0
            epoch, daemon_id = self._take(reservation)
            if epoch != self._link.epoch:
                raise CacheError("the daemon restarted while these pages were written; store again")
            if self.fence(reservation).bad_positions():
                self._link.abort_store(daemon_id)
                raise CacheError("reserved slots changed owner while they were written (this "
                                 "client was silent past orphan_quarantine_s); nothing published")
            reply = self._link.session.call(p.CommitStore(daemon_id))
            if type(reply) is not p.CommitReply:
                raise CacheError(f"store not published: {getattr(reply, 'message', reply)}")
            return reply.num_published

    def abort_store_keys(self, reservation: KeyedReservation) -> None:
        with self._lock:
            held = self._reservations.pop(reservation.reservation_id, None)
            if held is not None and held[0] == self._link.epoch and not self._is_closed:
                self._link.abort_store(held[1])

    def _take(self, reservation: KeyedReservation) -> tuple[int, int]:
        held = self._reservations.pop(reservation.reservation_id, None)
        if held is None:
            raise CacheError(f"reservation {reservation.reservation_id} was committed, aborted or "
                             "reclaimed already; begin_store_keys() again")
        return held

    def _cost_model(self):
        return self._link.choice.cost   # the client side plans auto for the daemon's lookups

    def check_fresh(self) -> None:
        with self._lock:
            self._check_open()
            self._link.require_fresh()

    def stats(self) -> CacheStats:
        with self._lock:
            self._check_open()
            return self._link.cache_stats()

    def check_integrity(self, quiescent: bool = False) -> None:
        with self._lock:
            self._check_open()
            self._link.check_integrity(quiescent)

    def close(self) -> None:
        """Goodbye: the daemon ends this handle's leases and aborts its reservations."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            self._forget_all()
            self._link.close()
