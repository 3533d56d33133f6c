"""Client sessions: what each attached engine process holds, and reclaiming it when it goes.

A session is opened by Hello and named by 16 random bytes the client sends with
every request. It owns leases (lease id -> keys, one lease per key) and
reservations (id -> keys + StorePlan), and the prefetches it started or its
lookups set off (id -> ticket; they hold nothing of the client's: a prefetch
that outlives its client still brings pages into L2 for everyone). Whatever a
session owns is given back to
the cache when the client says Goodbye, when it is silent for ``lease_ttl_s``
(dead, e.g. kill -9), or, for one reservation, when it is not committed within
``reservation_ttl_s``. Ids are unique per daemon, so one client can never
release or commit another's.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

_MAX_PREFETCHES = 256


@dataclass(slots=True)
class Reservation:
    keys: list[bytes]
    plan: Any  # controller.core.StorePlan
    expires_at: float


@dataclass(slots=True)
class ClientSession:
    session_id: bytes
    name: str
    pid: int
    last_seen: float
    leases: dict[int, list[bytes]] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)
    prefetches: dict[int, Any] = field(default_factory=dict)   # id -> controller's Prefetch


class SessionTable:
    """Open sessions and their holdings; gives them back to ``core`` (a CacheCore)."""

    def __init__(self, core, lease_ttl_s: float, reservation_ttl_s: float) -> None:
        self.core = core
        self.lease_ttl_s = lease_ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        self.sessions: dict[bytes, ClientSession] = {}
        self._ids = itertools.count(1)
        self.num_leases = 0
        self.num_reservations = 0

    def open(self, name: str, pid: int) -> ClientSession:
        session = ClientSession(secrets.token_bytes(16), name, pid, time.monotonic())
        self.sessions[session.session_id] = session
        return session

    def add_lease(self, session: ClientSession, keys: list[bytes]) -> int:
        lease_id = next(self._ids)
        session.leases[lease_id] = keys
        self.num_leases += 1
        return lease_id

    def end_lease(self, session: ClientSession, lease_id: int) -> bool:
        keys = session.leases.pop(lease_id, None)
        if keys is None:
            return False
        self.num_leases -= 1
        self.core.release(keys)
        return True

    def add_reservation(self, session: ClientSession, keys: list[bytes], plan) -> int:
        res_id = next(self._ids)
        session.reservations[res_id] = Reservation(keys, plan,
                                                   time.monotonic() + self.reservation_ttl_s)
        self.num_reservations += 1
        return res_id

    def take_reservation(self, session: ClientSession, res_id: int) -> Reservation | None:
        found = session.reservations.pop(res_id, None)
        if found is not None:
            self.num_reservations -= 1
        return found

    def add_prefetch(self, session: ClientSession, ticket) -> int:
        """Name a running prefetch for ``session``; finished ones it named before are
        forgotten first, so a session holds at most ``_MAX_PREFETCHES`` names."""
        if len(session.prefetches) >= _MAX_PREFETCHES:
            for pid in [i for i, t in session.prefetches.items() if t.is_done]:
                del session.prefetches[pid]
            while len(session.prefetches) >= _MAX_PREFETCHES:
                session.prefetches.pop(next(iter(session.prefetches)))
        prefetch_id = next(self._ids)
        session.prefetches[prefetch_id] = ticket
        return prefetch_id

    def close(self, session: ClientSession) -> tuple[int, int]:
        """End every lease and abort every reservation of ``session``; (leases, reservations)."""
        self.sessions.pop(session.session_id, None)
        num_leases, num_res = len(session.leases), len(session.reservations)
        for lease_id in list(session.leases):
            self.end_lease(session, lease_id)
        for res_id in list(session.reservations):
            self.core.abort_store(self.take_reservation(session, res_id).plan)
        return num_leases, num_res

    def reap(self, now: float) -> list[tuple[ClientSession, int, int]]:
        """Close sessions silent for the TTL and abort overdue reservations of live ones.

        Returns (session, leases, reservations) of each session closed, and of each
        live session with overdue reservations (0 leases)."""
        out = []
        dead = [s for s in self.sessions.values() if now - s.last_seen > self.lease_ttl_s]
        for session in dead:
            out.append((session, *self.close(session)))
        for session in self.sessions.values():
            overdue = [r for r, res in session.reservations.items() if res.expires_at < now]
            for res_id in overdue:
                self.core.abort_store(self.take_reservation(session, res_id).plan)
            if overdue:
                out.append((session, 0, len(overdue)))
        return out

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            self.close(session)

    def touch(self, session: ClientSession) -> None:
        session.last_seen = time.monotonic()

    def describe(self) -> Sequence[dict]:
        return [{"name": s.name, "pid": s.pid, "leases": len(s.leases),
                 "reservations": len(s.reservations)} for s in self.sessions.values()]
