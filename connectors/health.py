"""How an L3 store is doing: its errors counted by direction, since when it has been
failing, its last error, and a log that says so without flooding.

A full disk fails every page write; logging each one drowned the log in thousands
of identical lines while nothing counted them. Here every error is counted, and
the log gets, per direction (reads, writes):

    WARNING  the first error after a success (or at start)           at once
    WARNING  "still failing: N errors in the last 10 s; last: ..."   at most once per interval
    WARNING  "ok again after N errors over T s"                      at the first success after
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("connectors")

DIRECTIONS = ("read", "write")


@dataclass
class _Direction:
    num_errors: int = 0
    failing_since: float | None = None   # wall-clock time of the first error of this spell
    spell_errors: int = 0                # errors since failing_since
    unlogged: int = 0                    # errors since the last log line
    logged_at: float = 0.0               # monotonic time of the last log line


@dataclass(frozen=True)
class HealthSnapshot:
    """A store's health at one moment (safe to keep)."""

    failing: tuple[str, ...]
    """Directions whose latest outcome was an error: () when the store is ok."""
    failing_since: float | None
    """Wall-clock time (time.time()) the oldest current spell of errors began; None when ok."""
    last_error: str
    """The latest error's text ("" if none since start)."""
    last_error_at: float | None
    num_read_errors: int
    num_write_errors: int

    @property
    def is_ok(self) -> bool:
        return not self.failing

    @property
    def status(self) -> str:
        """"ok", or "failing (writes)" and the like."""
        return "ok" if self.is_ok else f"failing ({', '.join(d + 's' for d in self.failing)})"


class StoreHealth:
    """Counts a store's errors and successes (any thread) and logs them, rate-limited."""

    def __init__(self, name: str, log_interval_s: float = 10.0) -> None:
        self.name = name
        self.log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._dirs = {d: _Direction() for d in DIRECTIONS}
        self._last_error = ""
        self._last_error_at: float | None = None

    def failed(self, direction: str, message: str) -> None:
        """One failed operation (a page or a batch) reading or writing the store."""
        now = time.monotonic()
        with self._lock:
            d = self._dirs[direction]
            d.num_errors += 1
            d.spell_errors += 1
            d.unlogged += 1
            self._last_error, self._last_error_at = message, time.time()
            if d.failing_since is None:
                d.failing_since = self._last_error_at
                line = f"L3 {self.name}: {direction}s failing: {message}"
            elif now - d.logged_at >= self.log_interval_s:
                line = (f"L3 {self.name}: {direction}s still failing: {d.unlogged} errors in the "
                        f"last {now - d.logged_at:.0f} s ({d.spell_errors} since "
                        f"{time.strftime('%H:%M:%S', time.localtime(d.failing_since))}); last: {message}")
            else:
                return
            d.unlogged, d.logged_at = 0, now
        log.warning("%s", line)

    def succeeded(self, direction: str) -> None:
        """One operation in ``direction`` worked: a failing spell, if any, is over."""
        d = self._dirs[direction]
        if d.failing_since is None:   # the common case: no lock
            return
        with self._lock:
            if d.failing_since is None:
                return
            spell, since = d.spell_errors, d.failing_since
            d.failing_since, d.spell_errors, d.unlogged = None, 0, 0
        log.warning("L3 %s: %ss ok again after %d errors over %.1f s", self.name, direction,
                    spell, time.time() - since)

    def snapshot(self) -> HealthSnapshot:
        with self._lock:
            failing = tuple(n for n, d in self._dirs.items() if d.failing_since is not None)
            starts = [self._dirs[n].failing_since for n in failing]
            return HealthSnapshot(failing, min(starts) if starts else None, self._last_error,
                                  self._last_error_at, self._dirs["read"].num_errors,
                                  self._dirs["write"].num_errors)
