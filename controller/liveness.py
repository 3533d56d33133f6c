"""Fail open, fast: whether the daemon answers, as one client sees it.

The engine must never wait on a cache that is down beyond one request timeout::

    up ──(a request times out)──> down ──(a probe's Ping is answered)──> up
          one WARNING                                   one INFO

While down, every request fails at once with ``DaemonDown`` (the client turns a
lookup into a miss, a store into skipped pages, a prefetch into nothing) without
touching a socket, and a background thread pings the daemon on a socket of its
own: after 0.25 s, then backing off to once every ``max_interval_s``. Once it
answers, requests go out again; the session re-attaches by itself if the daemon
restarted or reclaimed it meanwhile (``Session.call``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from controller.api import CacheError

log = logging.getLogger("controller.client")

FIRST_PROBE_S = 0.25
MAX_PROBE_INTERVAL_S = 2.0
MAX_PROBE_TIMEOUT_S = 1.0


class DaemonUnavailable(CacheError):
    """The daemon did not answer within the request's deadline."""


class DaemonDown(DaemonUnavailable):
    """The daemon did not answer a recent request; this one was not sent (it failed at
    once). A background probe sees when the daemon is back."""


@dataclass(frozen=True)
class LinkHealth:
    """How the daemon has answered this client (``DaemonClient.link_health()``)."""

    is_up: bool
    """False from a timed-out request until a probe gets an answer."""
    down_for_s: float
    """Seconds since it went down (0 while up)."""
    num_outages: int
    """Times it went down."""
    num_failed_fast: int
    """Requests refused at once while it was down (lookups that were misses, ...)."""
    num_probes: int
    """Pings sent by the background probe."""


class DaemonWatch:
    """The up/down state of one session's daemon and the probe that ends a "down".

    ``probe(timeout_s)`` pings the daemon on a socket of the probe thread's own and
    raises CacheError when it does not answer; ``close_probe()`` runs on that thread
    when it ends. Thread-safe."""

    def __init__(self, address: str, probe: Callable[[float], None],
                 close_probe: Callable[[], None], probe_timeout_s: float) -> None:
        self.address = address
        self._probe = probe
        self._close_probe = close_probe
        self._probe_timeout_s = min(probe_timeout_s, MAX_PROBE_TIMEOUT_S)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._num_outages = self._num_failed_fast = self._num_probes = 0

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def check(self) -> None:
        """Raise DaemonDown at once while the daemon is down."""
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            self._num_failed_fast += 1
            down_for = time.monotonic() - self._down_since
        raise DaemonDown(f"the kvstore daemon at {self.address} has not answered for "
                         f"{down_for:.1f} s; skipping the request until it is back")

    def mark_down(self, reason: str) -> None:
        """A request timed out: fail later ones fast and start probing."""
        with self._lock:
            if self._down_since is not None or self._stop.is_set():
                return
            self._down_since = time.monotonic()
            self._num_outages += 1
            thread = self._thread = threading.Thread(target=self._run, name="kvstore-probe",
                                                     daemon=True)
        log.warning("kvstore daemon down: %s; lookups are misses and stores are skipped "
                    "until it answers again", reason)
        thread.start()

    def health(self) -> LinkHealth:
        with self._lock:
            since = self._down_since
            return LinkHealth(since is None, 0.0 if since is None else time.monotonic() - since,
                              self._num_outages, self._num_failed_fast, self._num_probes)

    def close(self) -> None:
        """Stop probing (the probe thread ends after its ping in flight). Idempotent."""
        self._stop.set()

    def _run(self) -> None:
        interval = FIRST_PROBE_S
        try:
            while not self._stop.wait(interval):
                with self._lock:
                    self._num_probes += 1
                try:
                    self._probe(self._probe_timeout_s)
                except CacheError:
                    interval = min(interval * 2, MAX_PROBE_INTERVAL_S)
                    continue
                self._mark_up()
                return
        finally:
            self._close_probe()

    def _mark_up(self) -> None:
        with self._lock:
            down_for = time.monotonic() - self._down_since
            self._down_since = None
            self._thread = None
        log.info("kvstore daemon at %s answers again after %.1f s", self.address, down_for)
