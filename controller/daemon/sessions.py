"""Client sessions: what each attached engine process holds, and when it is given back.

A session is opened by Hello and named by 16 random bytes the client sends with
every request. It owns leases (lease id -> keys, one lease per key) and
reservations (id -> keys + StorePlan), and the prefetches it started or its
lookups set off (id -> ticket; they hold nothing of the client's: a prefetch
that outlives its client still brings pages into L2 for everyone). Ids are
unique per daemon, so one client can never release or commit another's.

Fencing: the invariant is that no reader consumes bytes other than those the
committed writer of the page wrote, whatever any client does with its timing.
A silent client is not necessarily a dead one (SIGSTOP, a debugger, a cgroup
freeze, swap): it may resume in the middle of a copy out of its leased slots or
into its reserved ones. So a session's slots are never handed to anyone else
while its process may still copy:

- **watched** clients (the daemon verified their pid, start time and pid
  namespace at Hello, ``controller.process_identity``): a silent one whose
  process still lives is *suspended*, keeping its session, leases and
  reservations until it speaks again (then it goes on as if nothing happened) or
  its process is gone. A process that is gone is reclaimed at once, sooner than
  ``lease_ttl_s``.
- **unwatched** clients (another pid namespace): silent for ``lease_ttl_s``, the
  session ends. Its leases end at once (readers are fenced by generations, below);
  its reserved slots are *quarantined* (kept out of use, since a paused writer
  could still copy into them) until the daemon stops, or for
  ``orphan_quarantine_s`` when that is set.
- a reservation open past ``reservation_ttl_s`` is reported, never taken away
  from a live session: a slow writer may still be copying.

What is left to readers: each leased slot's generation travels with the lease
and is checked after the copy (``kvstore.slot_fence``), so a slot reused under an
unwatched reader makes its load fail as a reported LoadError, never a silent
success. Goodbye ends a session at once (the client has finished its copies).
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from controller.process_identity import ProcessIdentity, is_alive, verify

_MAX_PREFETCHES = 256


@dataclass(slots=True)
class Reservation:
    keys: list[bytes]
    plan: Any  # controller.core.StorePlan
    expires_at: float
    is_reported: bool = False


@dataclass(slots=True)
class ClientSession:
    session_id: bytes
    name: str
    pid: int
    last_seen: float
    start_ticks: int = 0
    """Non-zero when the daemon verified the client's process (it is *watched*)."""
    is_suspended: bool = False
    leases: dict[int, list[bytes]] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)
    prefetches: dict[int, Any] = field(default_factory=dict)   # id -> controller's Prefetch
    core: Any = None
    """The CacheCore of the session's pool (its tenant and layout); None for a session
    that named no layout (``kvstore status``): it may only ask for stats."""
    tenant: str = ""
    uid: int | None = None
    """The client's uid as the daemon verified it (SO_PEERCRED), None when unknown (tcp)."""

    @property
    def is_watched(self) -> bool:
        return self.start_ticks != 0


class _Quarantined(NamedTuple):
    release_at: float
    plans: list[Any]
    core: Any


class ReapEvent(NamedTuple):
    """Something the reaper did: ``kind`` is gone (process exited: reclaimed), suspended
    (silent, process alive: kept), orphaned (silent, unwatched: leases ended, reserved
    slots quarantined), released (a quarantine ended) or overdue (reservations past
    their TTL: kept)."""

    kind: str
    session: ClientSession | None
    num_leases: int
    num_reservations: int


class SessionTable:
    """Open sessions and their holdings; gives them back to their session's core (a
    CacheCore; ``core`` is the default for sessions opened without one)."""

    def __init__(self, core, lease_ttl_s: float, reservation_ttl_s: float,
                 heartbeat_interval_s: float = 1.0, orphan_quarantine_s: float | None = None) -> None:
        self.core = core
        self.lease_ttl_s = lease_ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        # A heartbeating client is never silent this long; past it, look at its process.
        self.silence_s = min(2 * heartbeat_interval_s, lease_ttl_s)
        self.orphan_quarantine_s = float("inf") if orphan_quarantine_s is None else orphan_quarantine_s
        self.sessions: dict[bytes, ClientSession] = {}
        self._quarantine: list[_Quarantined] = []
        self._ids = itertools.count(1)
        self.num_leases = 0
        self.num_reservations = 0

    def open(self, name: str, claim: ProcessIdentity, core: Any = None, tenant: str = "",
             uid: int | None = None) -> ClientSession:
        """A new session (of ``core``'s pool); its process is watched when ``claim`` verifies."""
        start = claim.start_ticks if verify(claim) else 0
        session = ClientSession(secrets.token_bytes(16), name, claim.pid, time.monotonic(), start,
                                core=core if core is not None else self.core, tenant=tenant, uid=uid)
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
        session.core.release(keys)
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
        """End every lease and abort every reservation of ``session`` now (Goodbye, or its
        process is gone); (leases, reservations)."""
        counts = self._detach(session)
        for res in session.reservations.values():
            session.core.abort_store(res.plan)
        session.reservations.clear()
        return counts

    def _detach(self, session: ClientSession) -> tuple[int, int]:
        """Forget ``session`` and end its leases now; its reservations are left to the
        caller (aborted, or quarantined). (leases, reservations) it held."""
        self.sessions.pop(session.session_id, None)
        num_leases, num_res = len(session.leases), len(session.reservations)
        self.num_leases -= num_leases
        self.num_reservations -= num_res
        for keys in session.leases.values():
            session.core.release(keys)
        session.leases.clear()
        return num_leases, num_res

    def _quarantine_session(self, session: ClientSession, now: float) -> tuple[int, int]:
        """End the session: its leases now, its reserved slots after the quarantine."""
        counts = self._detach(session)
        if session.reservations:
            self._quarantine.append(_Quarantined(
                now + self.orphan_quarantine_s, [r.plan for r in session.reservations.values()],
                session.core))
        session.reservations.clear()
        return counts

    def reap(self, now: float) -> list[ReapEvent]:
        """Look after silent sessions, overdue reservations and ended quarantines (the
        module doc says what happens to each); what was done, for the log and metrics."""
        events: list[ReapEvent] = []
        for session in [s for s in self.sessions.values() if now - s.last_seen > self.silence_s]:
            event = self._reap_silent(session, now - session.last_seen, now)
            if event is not None:
                events.append(event)
        for session in self.sessions.values():
            overdue = [r for r in session.reservations.values()
                       if r.expires_at < now and not r.is_reported]
            for res in overdue:
                res.is_reported = True
            if overdue:
                events.append(ReapEvent("overdue", session, 0, len(overdue)))
        events.extend(self._end_quarantines(now))
        return events

    def _reap_silent(self, session: ClientSession, silent_s: float, now: float) -> ReapEvent | None:
        if session.is_watched:
            if not is_alive(session.pid, session.start_ticks):
                return ReapEvent("gone", session, *self.close(session))
            if silent_s > self.lease_ttl_s and not session.is_suspended:
                session.is_suspended = True
                return ReapEvent("suspended", session, len(session.leases), len(session.reservations))
            return None
        if silent_s > self.lease_ttl_s:
            return ReapEvent("orphaned", session, *self._quarantine_session(session, now))
        return None

    def _end_quarantines(self, now: float) -> list[ReapEvent]:
        ended = [q for q in self._quarantine if q.release_at <= now]
        if not ended:
            return []
        self._quarantine = [q for q in self._quarantine if q.release_at > now]
        for q in ended:
            for plan in q.plans:
                q.core.abort_store(plan)
        return [ReapEvent("released", None, 0, sum(len(q.plans) for q in ended))]

    @property
    def num_quarantined_slots(self) -> int:
        return sum(len(plan.slots) for q in self._quarantine for plan in q.plans)

    @property
    def num_suspended(self) -> int:
        return sum(s.is_suspended for s in self.sessions.values())

    def close_all(self) -> None:
        """At shutdown: every session and quarantine gives its slots back."""
        for session in list(self.sessions.values()):
            self.close(session)
        self._end_quarantines(float("inf"))

    def touch(self, session: ClientSession) -> bool:
        """The client spoke; True if it was suspended until now."""
        session.last_seen = time.monotonic()
        was_suspended, session.is_suspended = session.is_suspended, False
        return was_suspended

    def describe(self) -> Sequence[dict]:
        return [{"name": s.name, "pid": s.pid, "leases": len(s.leases),
                 "reservations": len(s.reservations), "watched": s.is_watched,
                 "suspended": s.is_suspended} for s in self.sessions.values()]
