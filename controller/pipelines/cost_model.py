"""The load-or-recompute cost model behind the ``auto`` prefetch policy.

For one request it predicts the time to first token of every choice "load the first
k hit pages, recompute the rest" and picks the least, from rates measured online:

    T(k) = wait(k) + load(k) + prefill(tokens - k*P | prefix k*P)

    wait(k)    0 while page k is already in L2; else the predicted arrival of page k from
               the running prefetch: calls(j) * l3_latency + j * page_bytes / l3_rate,
               j = k - pages ready, calls(j) = ceil(j / batch_pages) (+ the existence
               check while it runs; until it answers, the pages expected are the leading
               pending pages this cache knows L3 holds (it wrote them, or a read or check
               found them: ``L3Presence``), or, when it knows none, the share that recent
               checks starting at such an unknown page found: the new tail of a prompt is
               never in L3, and waiting a round trip to learn so is a loss, while a
               session's earlier turns, written here, are)
    load(k)    k * page_bytes / l2_rate (L2 -> device; 0 until a rate is measured)
    prefill    a + b*n + c*n*(p + n/2)   (n tokens computed over a prefix of p: per-token
               matmuls and causal attention), fitted to what the engine reports

k = 0 (recompute everything) is always a candidate, so the choice never predicts more
than recompute. Priors, before anything is measured: L2 pages always load (an L2 page
loads in a small fraction of its recompute on every device we know); before the first
L3 read, the link's latency and rate come from the backup's writes to the same L3
(every page a read finds was written first, usually by this cache: writes measure the
link before any read does, and a write is rarely faster than a read of the same
bytes); with a prefill rate but neither, the wait for L3 pages is at most
``explore_fraction`` of the predicted recompute (the prefetch measures L3 meanwhile,
and the next request plans with the rate). With no prefill rate at all (an engine that never reported one, and
no ``auto_prefill_tokens_per_s`` prior in the config) there is nothing to weigh a wait
against: the lookup waits for the prefetch, as ``wait_complete`` does.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np

if TYPE_CHECKING:
    from controller.config import PrefetchConfig


class DecayedFit:
    """Non-negative least squares y ~ w . x over exponentially decayed samples.

    Keeps only the decayed Gram matrix and moment vector (O(features^2) state); a feature
    whose weight would go negative is dropped from the solve (active set), so predictions
    never fall below what the kept features say."""

    def __init__(self, num_features: int, decay: float = 0.97, ridge: float = 1e-9) -> None:
        self._gram = np.zeros((num_features, num_features))
        self._moment = np.zeros(num_features)
        self._decay, self._ridge = decay, ridge
        self.num_samples = 0
        self._weights: np.ndarray | None = None

    def add(self, x: np.ndarray, y: float) -> None:
        self._gram = self._decay * self._gram + np.outer(x, x)
        self._moment = self._decay * self._moment + x * y
        self.num_samples += 1
        self._weights = None

    @property
    def weights(self) -> np.ndarray:
        if self._weights is None:
            self._weights = self._solve()
        return self._weights

    def _solve(self) -> np.ndarray:
        n = len(self._moment)
        active = list(range(n))
        weights = np.zeros(n)
        while active:
            gram = self._gram[np.ix_(active, active)]
            # Ridge relative to the Gram's scale: degenerate samples (every batch the same
            # size) split the weight smoothly instead of blowing up.
            ridge = self._ridge * max(1e-30, float(np.trace(gram))) * np.eye(len(active))
            solved = np.linalg.solve(gram + ridge, self._moment[active])
            if (solved >= 0).all():
                weights[:] = 0
                weights[active] = solved
                return weights
            active.pop(int(np.argmin(solved)))
        return weights


class RecentMedian:
    """The median of the last ``size`` values: one slow outlier (a first call that builds
    kernels, a stall of the host) moves it not at all, a lasting change within size/2."""

    def __init__(self, size: int = 16) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._median: float | None = None

    def add(self, value: float) -> None:
        self._values.append(value)
        self._median = None

    @property
    def value(self) -> float | None:
        # Kept between samples: a plan reads it several times, and np.median of 16 floats
        # was 60% of a plan's time (a plan is on every lookup's path).
        if self._median is None and self._values:
            self._median = float(statistics.median(self._values))
        return self._median


class PrefillRate:
    """Engine prefill seconds as a function of tokens computed and cached prefix."""

    _MIN_FIT_SAMPLES = 4
    _FIT_BAND = (0.05, 20.0)   # a fitted prediction this far from the per-token one is not trusted

    def __init__(self, prior_tokens_per_s: float | None = None) -> None:
        self._fit = DecayedFit(3)
        self._per_token = RecentMedian()
        self._prior = 1.0 / prior_tokens_per_s if prior_tokens_per_s else None

    @property
    def is_known(self) -> bool:
        return self.seconds_per_token is not None

    @property
    def seconds_per_token(self) -> float | None:
        measured = self._per_token.value
        return measured if measured is not None else self._prior

    @staticmethod
    def _features(num_tokens: np.ndarray, num_cached: np.ndarray) -> np.ndarray:
        n, p = num_tokens / 1e3, num_cached / 1e3   # thousands of tokens: a well-scaled Gram
        return np.stack([np.ones_like(n), n, n * (p + n / 2)], axis=-1)

    def observe(self, num_tokens: int, num_cached: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        x = self._features(np.array(float(num_tokens)), np.array(float(num_cached)))
        self._fit.add(x, seconds)
        self._per_token.add(seconds / num_tokens)

    def predict(self, num_tokens: np.ndarray, num_cached: np.ndarray) -> np.ndarray:
        """Seconds to prefill ``num_tokens`` over ``num_cached`` (arrays of equal shape)."""
        num_tokens = np.asarray(num_tokens, dtype=float)
        per_token = num_tokens * self.seconds_per_token
        if self._fit.num_samples < self._MIN_FIT_SAMPLES:
            return per_token   # one rate until there is enough to fit a shape
        fitted = self._features(num_tokens, np.asarray(num_cached, dtype=float)) @ self._fit.weights
        low, high = self._FIT_BAND
        return np.where((fitted >= low * per_token) & (fitted <= high * per_token), fitted, per_token)


class L3Rate:
    """Seconds of one L3 call as latency + bytes / rate (reads and existence checks);
    until a read is measured, what the link's writes measured (module doc)."""

    def __init__(self) -> None:
        self._fit = DecayedFit(2, ridge=1e-6)
        self._write_fit = DecayedFit(2, ridge=1e-6)
        self.num_reads = 0
        self.num_writes = 0
        self._told: tuple[float, float] | None = None

    @property
    def is_known(self) -> bool:
        return self.num_reads > 0 or self._told is not None or self.num_writes > 0

    @property
    def is_from_writes(self) -> bool:
        """The rates are the write prior's (no read measured, none told)."""
        return not self.num_reads and self._told is None and self.num_writes > 0

    def observe_write(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self._write_fit.add(np.array([1.0, nbytes / 1e6]), seconds)
            self.num_writes += 1

    def assume(self, latency_s: float, gbps: float) -> None:
        """Rates measured where the reads run (a daemon client learns its daemon's)."""
        self._told = (latency_s, 1e-3 / gbps) if gbps > 0 else None

    def observe(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        self._fit.add(np.array([1.0, nbytes / 1e6]), seconds)
        self.num_reads += nbytes > 0

    @property
    def latency_s(self) -> float:
        if self.num_reads:
            return float(self._fit.weights[0])
        if self._told:
            return self._told[0]
        return float(self._write_fit.weights[0])

    @property
    def seconds_per_mb(self) -> float:
        if self.num_reads:
            return float(self._fit.weights[1])
        if self._told:
            return self._told[1]
        return float(self._write_fit.weights[1])


class ExistsYield:
    """The share of the pages asked in recent L3 existence checks that L3 held (decayed
    page counts; None until a check answered)."""

    def __init__(self, decay: float = 0.9) -> None:
        self._asked = self._found = 0.0
        self._decay = decay

    def observe(self, num_asked: int, num_found: int) -> None:
        if num_asked > 0:
            self._asked = self._decay * self._asked + num_asked
            self._found = self._decay * self._found + min(max(num_found, 0), num_asked)

    @property
    def value(self) -> float | None:
        return self._found / self._asked if self._asked else None


class L3Presence:
    """Keys this cache knows L3 holds: written by its backup, or found by a read or an
    existence check (the most recent ``max_keys``; a read or check that misses one
    forgets it). Before an existence check answers, the leading run of these among the
    pending pages is what a prefetch is expected to bring: a session's earlier turns are
    there, its new tail is not (the pages after the run are not counted on)."""

    def __init__(self, max_keys: int = 1 << 16) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._max_keys = max_keys

    def add(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._keys.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def run_length(self, keys: Sequence[Hashable], also: Callable[[Hashable], bool] | None = None) -> int:
        """How many leading ``keys`` are known (``also``: another test that counts, e.g.
        a page still waiting in the backup queue)."""
        n = 0
        for key in keys:
            if key not in self._keys and not (also is not None and also(key)):
                break
            n += 1
        return n


@dataclass(frozen=True)
class Plan:
    """What to do for one request now.

    ``num_pages``: load the first this many hit pages, recompute the rest. ``wait_s``:
    that needs pages still on their way from L3; wait this long, then plan again
    (0: go now, with what is ready). ``give_up_s``: waiting longer than this from now
    cannot pay even if every page then arrived at once (what is ready wins)."""

    num_pages: int
    wait_s: float = 0.0
    give_up_s: float = 0.0
    predicted_ttft_s: float = math.nan
    predicted_recompute_s: float = math.nan
    is_modelled: bool = False
    """From measured rates (else a prior's budget, counted from the first wait)."""
    is_write_prior: bool = False
    """The L3 rates are the writes' (no read measured yet): a store that absorbs writes in
    a cache (a disk's page cache) reads slower than it writes, so ``wait_auto`` waits at
    most twice the predicted wait before it trusts what is ready instead."""


class CostModel:
    """Rates measured online and the per-request choice (module doc). Thread-safe: the
    engine thread plans and reports prefills, the L3 loop reports reads."""

    def __init__(self, page_size: int, page_bytes: int, batch_pages: int,
                 explore_fraction: float = 0.02, prior_tokens_per_s: float | None = None) -> None:
        self.page_size, self.page_bytes, self.batch_pages = page_size, page_bytes, batch_pages
        self.explore_fraction = explore_fraction
        self.prefill = PrefillRate(prior_tokens_per_s)
        self.l3 = L3Rate()
        self.exists_yield = ExistsYield()
        """Of checks that started at a page ``presence`` did not know (see plan)."""
        self.presence = L3Presence()
        self._l2_seconds_per_byte = RecentMedian()
        self._lock = threading.Lock()

    # ---- measurements ------------------------------------------------------------------
    def observe_prefill(self, num_tokens: int, num_cached: int, seconds: float) -> None:
        with self._lock:
            self.prefill.observe(num_tokens, num_cached, seconds)

    def observe_l3(self, nbytes: int, seconds: float) -> None:
        """One L3 call: a read of ``nbytes`` (0 for an existence check) took ``seconds``."""
        with self._lock:
            self.l3.observe(nbytes, seconds)

    def observe_l3_write(self, nbytes: int, seconds: float) -> None:
        """One L3 write of ``nbytes`` took ``seconds`` (the prior until a read is measured)."""
        with self._lock:
            self.l3.observe_write(nbytes, seconds)

    def observe_exists(self, num_asked: int, num_found: int) -> None:
        """An L3 existence check of ``num_asked`` pages, from one ``presence`` did not know,
        found the first ``num_found``."""
        with self._lock:
            self.exists_yield.observe(num_asked, num_found)

    def observe_exists_keys(self, keys: Sequence[Hashable], num_found: int) -> None:
        """An existence check of ``keys`` found the first ``num_found``: they are known now,
        the next one is not; the share counts only checks from an unknown page (a known
        one is expected through ``presence``)."""
        with self._lock:
            if keys and keys[0] not in self.presence:
                self.exists_yield.observe(len(keys), num_found)
            self._note_l3_locked(list(keys[:num_found]), keys[num_found] if num_found < len(keys) else None)

    def note_l3(self, present: Sequence[Hashable], missing: Hashable | None = None) -> None:
        """Keys L3 holds now (written, or read back), and one it lacks (a read missed it)."""
        with self._lock:
            self._note_l3_locked(present, missing)

    def _note_l3_locked(self, present: Sequence[Hashable], missing: Hashable | None) -> None:
        self.presence.add(present)
        if missing is not None:
            self.presence.discard(missing)

    def num_known(self, keys: Sequence[Hashable], also: Callable[[Hashable], bool] | None = None) -> int:
        """How many leading ``keys`` are known to be in L3 (see ``L3Presence.run_length``)."""
        with self._lock:
            return self.presence.run_length(keys, also)

    def observe_l2_load(self, nbytes: int, seconds: float) -> None:
        """A load of ``nbytes`` from L2 held the engine up ``seconds`` (its exposed part)."""
        if nbytes > 0 and seconds >= 0:
            with self._lock:
                self._l2_seconds_per_byte.add(seconds / nbytes)

    def rates(self) -> dict[str, float | None]:
        """What is known now (for stats and reports); None where nothing was measured."""
        with self._lock:
            l3 = self.l3.is_known and not self.l3.is_from_writes   # reads only: the stats say "read"
            return {
                "l3_latency_s": self.l3.latency_s if l3 else None,
                "l3_read_gbps": 1e-3 / self.l3.seconds_per_mb if l3 and self.l3.seconds_per_mb else None,
                "l3_exists_yield": self.exists_yield.value,
                "l2_load_gbps": 1e-9 / l2 if (l2 := self._l2_seconds_per_byte.value) else None,
                "prefill_tokens_per_s": (1 / self.prefill.seconds_per_token
                                         if self.prefill.is_known else None),
            }

    # ---- the choice ----------------------------------------------------------------------
    def plan(self, num_tokens: int, num_ready: int, num_pending: int,
             is_checking: bool = False, waited_s: float = 0.0, num_known: int | None = None) -> Plan:
        """The choice for a prompt of ``num_tokens`` whose first ``num_ready`` pages are in
        L2 and whose next ``num_pending`` pages a prefetch is reading (``is_checking``: its
        existence check has not answered yet). ``waited_s``: waited for them so far.
        ``num_known``: of the pending pages, the leading ones known to be in L3
        (``presence``; None: the caller cannot tell)."""
        with self._lock:
            num_ready = max(0, min(num_ready, num_tokens // self.page_size))
            num_pending = max(0, min(num_pending, num_tokens // self.page_size - num_ready))
            found_share = self.exists_yield.value
            if is_checking and num_pending and self.prefill.is_known:
                # Not every page after the L2 hit is in L3 (a prompt's new tail never is):
                # expect the run known to be there, else the share recent checks from an
                # unknown page found (the check's round trip is in wait).
                if num_known:
                    num_pending = min(num_known, num_pending)
                elif found_share is not None:
                    num_pending = int(math.floor(found_share * num_pending + 0.5))
            if not self.prefill.is_known:   # nothing to weigh a wait against: wait_complete
                return Plan(num_ready + num_pending, math.inf if num_pending else 0.0, math.inf)
            if not num_pending and self._l2_seconds_per_byte.value is None:
                # Free loads and a prefill that only shrinks as the prefix grows: load all
                # (an L2 hit's hot path predicts two points, not every k).
                ends = self.prefill.predict(np.array([num_tokens - num_ready * self.page_size, num_tokens]),
                                            np.array([num_ready * self.page_size, 0]))
                return Plan(num_ready, 0.0, 0.0, float(ends[0]), float(ends[1]), True)
            k = np.arange(num_ready + num_pending + 1)
            cost = self._load_s(k) + self.prefill.predict(num_tokens - k * self.page_size,
                                                          k * self.page_size)
            best_ready = int(np.argmin(cost[: num_ready + 1]))
            recompute_s = float(cost[0])
            if not num_pending:
                return Plan(best_ready, 0.0, 0.0, float(cost[best_ready]), recompute_s)
            if not self.l3.is_known:
                return self._plan_exploring(num_ready, num_pending, cost, best_ready, waited_s)
            # Sunk waiting does not count here: what is best from now on is chosen.
            wait = self._arrival_s(k - num_ready, is_checking)
            total = cost + wait
            best = int(np.argmin(total))
            give_up = max(0.0, float(cost[best_ready] - cost[best]))
            if best <= num_ready:
                return Plan(best_ready, 0.0, give_up, float(cost[best_ready]), recompute_s, True)
            return Plan(best, float(wait[best]), give_up, float(total[best]), recompute_s, True,
                        self.l3.is_from_writes)

    def _plan_exploring(self, num_ready: int, num_pending: int, cost: np.ndarray,
                        best_ready: int, waited_s: float) -> Plan:
        # L3 rate unknown: risk at most explore_fraction of a recompute on it.
        budget = self.explore_fraction * float(cost[0])
        if waited_s < budget:
            return Plan(num_ready + num_pending, budget - waited_s, budget,
                        predicted_recompute_s=float(cost[0]))
        return Plan(best_ready, 0.0, budget, float(cost[best_ready]), float(cost[0]))

    def _load_s(self, k: np.ndarray) -> np.ndarray:
        per_byte = self._l2_seconds_per_byte.value
        if not per_byte:   # unmeasured, or loads hidden behind compute
            return np.zeros(len(k))
        return k * self.page_bytes * per_byte

    def _arrival_s(self, j: np.ndarray, is_checking: bool) -> np.ndarray:
        """Seconds until the j-th pending page is in L2 (0 for j <= 0)."""
        j = np.maximum(j, 0)
        calls = np.ceil(j / self.batch_pages) + (1 if is_checking else 0)
        seconds = calls * self.l3.latency_s + j * self.page_bytes / 1e6 * self.l3.seconds_per_mb
        return np.where(j > 0, seconds, 0.0)


def new_cost_model(prefetch: "PrefetchConfig", page_size: int, page_bytes: int) -> CostModel:
    """The cost model of a cache with this prefetch config (its priors)."""
    return CostModel(page_size, page_bytes, prefetch.batch_pages, prefetch.auto_explore_fraction,
                     prefetch.auto_prefill_tokens_per_s)


_MIN_WAIT_S = 2e-4   # never spin: each round waits at least this long
_WRITE_PRIOR_FLOOR_S = 0.02
"""The least a plan on the write prior may wait: writes timed in microseconds say nothing
of a reader's scheduling delays on a busy host."""


@dataclass(frozen=True)
class Progress:
    """A prefetch as a waiting lookup sees it: pages ready (in L2, from the chain's start),
    pages still coming, whether L3 has not yet answered its existence check, whether done."""

    num_ready: int
    num_pending: int
    is_checking: bool = False
    is_done: bool = False
    num_known: int | None = None
    """Of the pending pages, the leading ones known to be in L3 (None: cannot tell)."""


def wait_auto(model: CostModel, num_tokens: int, poll: Callable[[float], Progress],
              backstop_s: float, max_rounds: int = 1000) -> Plan:
    """Wait on a prefetch while the model says the pages it brings are worth it, planning
    again after each wait (the rates and the progress change); returns the last plan.
    ``poll(wait_s)`` waits up to ``wait_s`` (0: not at all) and returns the progress.

    Late pages cannot keep it waiting: each modelled plan's ``give_up_s`` sets a deadline
    that later plans may only bring forward; ``backstop_s`` bounds the whole wait (an L3
    read that hangs ends by its own timeout; this is only a backstop)."""
    started = time.monotonic()
    deadline = started + backstop_s
    progress = poll(0.0)
    for _ in range(max_rounds):
        now = time.monotonic()
        plan = model.plan(num_tokens, progress.num_ready, progress.num_pending, progress.is_checking,
                          now - started, progress.num_known)
        if plan.is_modelled:
            deadline = min(deadline, now + plan.give_up_s)
        if plan.is_write_prior:   # unconfirmed by any read: no longer than twice its word
            deadline = min(deadline, now + max(2 * plan.wait_s, _WRITE_PRIOR_FLOOR_S))
        if plan.wait_s <= 0 or progress.is_done or now >= deadline:
            return plan
        progress = poll(max(_MIN_WAIT_S, min(plan.wait_s, deadline - now)))
    return plan


def worth_waiting_s(model: CostModel, num_tokens: int, num_ready: int, num_pending: int,
                    is_checking: bool, waited_s: float, num_known: int | None = None) -> float:
    """For a scheduler that polls instead of blocking: how much longer to wait (0: go).
    Never past the predicted time of recomputing the whole prompt, whatever the pages do."""
    plan = model.plan(num_tokens, num_ready, num_pending, is_checking, waited_s, num_known)
    if plan.is_modelled and waited_s >= plan.predicted_recompute_s:
        return 0.0
    return plan.wait_s
