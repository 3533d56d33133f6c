"""Fresh sessions: opened by Hello, nothing since. A bounded pool of their own, so that a
flood of Hellos cannot fill the client table and lock real clients out.

A real client follows its Hello at once with a request or a heartbeat; that makes
its session established (``graduate``). Until then a session is fresh, and fresh
sessions are bounded twice::

    per peer (one connected socket, the ROUTER identity):  at most MAX_PER_PEER
    in all:                                                  at most MAX_FRESH
    a Hello past either bound closes the oldest fresh session of that scope

Fresh sessions hold nothing (no lease, no reservation), so closing one costs its
client at most a re-attach; established sessions never count against these bounds,
and only they count against the daemon's client limit. A flood from one socket
churns that socket's own few sessions; a flood from many sockets churns the fresh
pool, while every established client keeps working and a new one that sends its
first request before MAX_FRESH more Hellos arrive is never touched.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Container

MAX_FRESH = 256
MAX_PER_PEER = 8


class FreshSessions:
    """Session ids that have sent nothing but Hello, oldest first, by peer."""

    def __init__(self, max_fresh: int = MAX_FRESH, max_per_peer: int = MAX_PER_PEER) -> None:
        self.max_fresh = max_fresh
        self.max_per_peer = max_per_peer
        self._peer_of: OrderedDict[bytes, bytes] = OrderedDict()   # session id -> peer
        self._by_peer: dict[bytes, deque[bytes]] = {}
        self.num_evicted = 0
        """Fresh sessions closed to make room (a sign of a Hello flood)."""

    def __len__(self) -> int:
        return len(self._peer_of)

    def add(self, session_id: bytes, peer: bytes, live: Container[bytes]) -> list[bytes]:
        """Track a new session of ``peer``; returns the ids of fresh sessions to close to
        stay within bounds (ids no longer in ``live`` are dropped first, silently)."""
        evict: list[bytes] = []
        mine = self._by_peer.setdefault(peer, deque())
        while len(mine) >= self.max_per_peer:
            evict.append(mine[0])
            self._forget(mine[0])
        if len(self._peer_of) >= self.max_fresh:
            self.prune(live)
        while len(self._peer_of) >= self.max_fresh:
            oldest = next(iter(self._peer_of))
            evict.append(oldest)
            self._forget(oldest)
        self._peer_of[session_id] = peer
        self._by_peer.setdefault(peer, deque()).append(session_id)
        evict = [s for s in evict if s in live]
        self.num_evicted += len(evict)
        return evict

    def graduate(self, session_id: bytes) -> None:
        """The session sent a real request: it is established, no longer fresh."""
        if session_id in self._peer_of:
            self._forget(session_id)

    def prune(self, live: Container[bytes]) -> None:
        """Forget fresh sessions that ended otherwise (reaped, Goodbye)."""
        for session_id in [s for s in self._peer_of if s not in live]:
            self._forget(session_id)

    def _forget(self, session_id: bytes) -> None:
        peer = self._peer_of.pop(session_id)
        mine = self._by_peer[peer]
        mine.remove(session_id)
        if not mine:
            del self._by_peer[peer]
