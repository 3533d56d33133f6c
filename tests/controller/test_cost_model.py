"""The auto policy's cost model with simulated rates: one test per decision."""

import threading
import time

import numpy as np
import pytest

from controller.api import PrefetchTicket
from controller.pipelines.cost_model import CostModel, DecayedFit, PrefillRate, Progress, RecentMedian, wait_auto

P = 32                 # tokens per page
PAGE_BYTES = 1 << 20   # 1 MiB pages
PROMPT = 64 * P        # a prompt of 64 pages


def model(prefill_us_per_token: float | None = 100.0, l3_latency_s: float | None = None,
          l3_gbps: float = 1.0, batch_pages: int = 8) -> CostModel:
    """A cost model fed with simulated measurements: prefill at a fixed cost per token plus
    attention, L3 calls at a latency plus bytes / rate."""
    m = CostModel(P, PAGE_BYTES, batch_pages, explore_fraction=0.02)
    if prefill_us_per_token is not None:
        for n, p in ((PROMPT, 0), (PROMPT // 2, PROMPT // 2), (P, PROMPT - P), (PROMPT // 4, 0),
                     (PROMPT // 8, PROMPT // 2)):
            m.observe_prefill(n, p, simulated_prefill_s(n, p, prefill_us_per_token))
    if l3_latency_s is not None:
        for pages in (batch_pages, batch_pages, batch_pages // 2):
            m.observe_l3(pages * PAGE_BYTES, l3_latency_s + pages * PAGE_BYTES / (l3_gbps * 1e9))
        m.observe_l3(0, l3_latency_s)   # an existence check
    return m


def simulated_prefill_s(n: int, p: int, us_per_token: float) -> float:
    return 1e-3 + n * us_per_token * 1e-6 + n * (p + n / 2) * 2e-9


def test_fit_recovers_a_linear_law():
    fit = DecayedFit(3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = np.array([1.0, *rng.uniform(0, 4, 2)])
        fit.add(x, float(x @ [0.5, 2.0, 3.0]))
    assert np.allclose(fit.weights, [0.5, 2.0, 3.0], rtol=1e-3)


def test_fit_never_returns_negative_weights():
    fit = DecayedFit(2)
    for x in (1.0, 2.0, 3.0):
        fit.add(np.array([1.0, x]), 10.0 - x)    # a falling line: the slope would be negative
    assert (fit.weights >= 0).all()


def test_recent_median_is_kept_between_samples_and_follows_them():
    median = RecentMedian(size=4)
    assert median.value is None
    for v in (1.0, 2.0, 3.0):
        median.add(v)
    assert median.value == 2.0 and median.value == 2.0   # read twice: the kept value
    median.add(10.0)
    median.add(11.0)                                       # window now 2, 3, 10, 11
    assert median.value == 6.5


def test_prefill_rate_predicts_the_simulated_engine():
    rate = PrefillRate()
    for n, p in ((2048, 0), (1024, 1024), (32, 2016), (512, 0), (256, 1024), (128, 512)):
        rate.observe(n, p, simulated_prefill_s(n, p, 100.0))
    for n, p in ((1000, 500), (64, 1900)):
        assert rate.predict(np.array([n]), np.array([p]))[0] == pytest.approx(
            simulated_prefill_s(n, p, 100.0), rel=0.02)


def test_l2_only_hit_loads_every_page():
    plan = model().plan(PROMPT, num_ready=40, num_pending=0)
    assert plan.num_pages == 40 and plan.wait_s == 0
    assert plan.predicted_ttft_s < plan.predicted_recompute_s


def test_fast_l3_waits_for_every_pending_page():
    m = model(l3_latency_s=1e-4, l3_gbps=50.0)
    plan = m.plan(PROMPT, num_ready=10, num_pending=50)
    assert plan.num_pages == 60 and plan.wait_s > 0
    assert plan.predicted_ttft_s < plan.predicted_recompute_s


def test_slow_l3_recomputes_what_is_not_ready():
    # 1 MiB pages at 0.05 GB/s: 21 ms a page against ~3-7 ms to recompute one.
    m = model(l3_latency_s=5e-3, l3_gbps=0.05)
    plan = m.plan(PROMPT, num_ready=0, num_pending=60)
    assert plan.num_pages == 0 and plan.wait_s == 0


def test_partial_load_takes_the_ready_pages_and_recomputes_the_rest():
    m = model(l3_latency_s=5e-3, l3_gbps=0.05)
    plan = m.plan(PROMPT, num_ready=12, num_pending=48)
    assert plan.num_pages == 12 and plan.wait_s == 0


def test_partial_wait_stops_where_batches_stop_paying():
    # Each L3 call costs 40 ms, a batch of 8 pages saves ~8 x 4 ms early in the prompt and more
    # late (attention): only the batches after the prompt's middle would pay, but the earlier
    # ones must come first, so the best is to take the ready pages.
    m = model(l3_latency_s=0.04, l3_gbps=100.0)
    assert m.plan(PROMPT, num_ready=8, num_pending=48).num_pages == 8
    # With 2 ms calls every batch pays: wait for the last page.
    m = model(l3_latency_s=0.002, l3_gbps=100.0)
    assert m.plan(PROMPT, num_ready=8, num_pending=48).num_pages == 56


def test_slow_l2_load_is_weighed_against_recompute():
    m = model()
    m.observe_l2_load(10 * PAGE_BYTES, 1.0)   # 100 ms a page: recompute is faster
    assert m.plan(PROMPT, num_ready=40, num_pending=0).num_pages == 0


def test_priors_bound_the_wait_for_an_unmeasured_l3():
    # No prefill rate: nothing to weigh against, so wait for the prefetch (wait_complete).
    no_prefill = model(prefill_us_per_token=None)
    plan = no_prefill.plan(PROMPT, num_ready=4, num_pending=20)
    assert plan.num_pages == 24 and plan.wait_s == float("inf")
    assert no_prefill.plan(PROMPT, num_ready=4, num_pending=0).num_pages == 4
    # A configured prior rate counts as known.
    prior = CostModel(P, PAGE_BYTES, 8, prior_tokens_per_s=1e4)
    assert prior.prefill.is_known and prior.plan(PROMPT, 4, 20).wait_s < 1
    exploring = model()   # prefill known, L3 not: 2% of the predicted recompute
    plan = exploring.plan(PROMPT, num_ready=4, num_pending=20)
    assert plan.wait_s == pytest.approx(0.02 * plan.predicted_recompute_s)
    assert exploring.plan(PROMPT, 4, 20, waited_s=plan.wait_s).num_pages == 4


def test_an_unanswered_existence_check_expects_only_the_share_l3_held():
    # 2 ms calls, fast reads: with every page after the hit expected, waiting for the check
    # and one read pays (the test above); but a prompt's new tail is never in L3.
    m = model(l3_latency_s=0.002, l3_gbps=100.0)
    assert m.plan(PROMPT, 8, 48, is_checking=True).num_pages == 56   # no check answered yet: all may come
    for _ in range(20):
        m.observe_exists(num_asked=10, num_found=0)   # recent checks found nothing
    plan = m.plan(PROMPT, 8, 48, is_checking=True)
    assert plan.num_pages == 8 and plan.wait_s == 0   # do not wait a round trip for nothing
    # Once the check has answered, its pages are real: wait for them.
    assert m.plan(PROMPT, 8, 48, is_checking=False).num_pages == 56
    # Half found: plan for half of the pending pages (and wait for them, here).
    half = model(l3_latency_s=0.002, l3_gbps=100.0)
    for _ in range(20):
        half.observe_exists(num_asked=10, num_found=5)
    assert half.rates()["l3_exists_yield"] == pytest.approx(0.5)
    assert half.plan(PROMPT, 8, 48, is_checking=True).num_pages == 8 + 24


def test_pages_known_in_l3_are_waited_for_before_the_check_answers():
    # The pipeline bench's cold start: the first checks were of new sessions' prompts (none
    # in L3), so the share of recent checks is ~0, yet a continuing session's earlier turns
    # were written to L3 by this cache: those are expected, the new tail is not.
    m = model(l3_latency_s=0.002, l3_gbps=100.0)
    for _ in range(20):
        m.observe_exists(num_asked=10, num_found=0)
    assert m.plan(PROMPT, 8, 48, is_checking=True).num_pages == 8            # share ~0: go
    plan = m.plan(PROMPT, 8, 48, is_checking=True, num_known=40)
    assert plan.num_pages == 48 and plan.wait_s > 0                          # the known run
    assert m.plan(PROMPT, 8, 48, is_checking=True, num_known=0).num_pages == 8   # none known
    # A high share of unknown pages does not make a known run longer than it is.
    high = model(l3_latency_s=0.002, l3_gbps=100.0)
    for _ in range(20):
        high.observe_exists(num_asked=10, num_found=9)
    assert high.plan(PROMPT, 8, 48, is_checking=True, num_known=20).num_pages == 28
    # Once the check has answered, its count is what comes (the known run is not asked).
    assert m.plan(PROMPT, 8, 30, is_checking=False, num_known=0).num_pages == 38


def test_presence_learns_from_writes_reads_and_checks():
    m = model()
    keys = [f"k{i}" for i in range(10)]
    m.note_l3(keys[:6])                                   # the backup wrote six
    assert m.num_known(keys) == 6
    assert m.num_known(keys[6:], also=lambda k: k == "k6") == 1   # one waits in the backup queue
    m.note_l3([], missing="k2")                           # a read missed it: forgotten
    assert m.num_known(keys) == 2
    # A check from a known page is not a sample of the unknown share; one from an unknown is.
    m.observe_exists_keys(keys[:4], num_found=2)
    assert m.exists_yield.value is None and m.num_known(keys) == 2
    m.observe_exists_keys(["new0", "new1", "new2", "new3"], num_found=1)
    assert m.exists_yield.value == 0.25 and m.num_known(["new0", "new1"]) == 1
    small = CostModel(P, PAGE_BYTES, 8)
    small.presence = type(small.presence)(max_keys=3)
    small.note_l3(keys[:5])                               # bounded: the oldest go first
    assert small.num_known(keys[2:]) == 3 and small.num_known(keys) == 0


def test_writes_stand_in_for_reads_until_a_read_is_measured():
    fast, slow = model(), model()   # prefill known, no L3 read measured
    for _ in range(3):
        fast.observe_l3_write(8 * PAGE_BYTES, 1e-4 + 8 * PAGE_BYTES / 50e9)
        slow.observe_l3_write(8 * PAGE_BYTES, 5e-3 + 8 * PAGE_BYTES / 0.05e9)
    plan = fast.plan(PROMPT, num_ready=10, num_pending=50)
    assert plan.is_modelled and plan.num_pages == 60 and plan.wait_s > 0   # no 2% exploring cap
    plan = slow.plan(PROMPT, num_ready=10, num_pending=50)
    assert plan.is_modelled and plan.num_pages == 10 and plan.wait_s == 0
    assert fast.rates()["l3_read_gbps"] is None      # the stats report reads only
    # A measured read replaces the prior: the slow link's reads turn out fast.
    for pages in (8, 8, 4):
        slow.observe_l3(pages * PAGE_BYTES, 1e-4 + pages * PAGE_BYTES / 50e9)
    assert slow.plan(PROMPT, num_ready=10, num_pending=50).num_pages == 60
    assert slow.rates()["l3_read_gbps"] == pytest.approx(50, rel=0.05)


def test_the_choice_never_predicts_more_than_recompute():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = model(prefill_us_per_token=float(rng.uniform(1, 500)), l3_latency_s=float(rng.uniform(0, 0.05)),
                  l3_gbps=float(rng.uniform(0.01, 50)), batch_pages=int(rng.integers(1, 33)))
        ready = int(rng.integers(0, 64))
        plan = m.plan(PROMPT, ready, int(rng.integers(0, 64 - ready + 1)))
        assert plan.predicted_ttft_s <= plan.predicted_recompute_s + 1e-12


class FakeTicket(PrefetchTicket):
    """Pages arrive one every ``page_s`` on a thread of their own."""

    def __init__(self, num_pages: int, page_s: float) -> None:
        self._num_pages, self._ready = num_pages, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(page_s,), daemon=True)
        self._thread.start()

    def _run(self, page_s: float) -> None:
        for _ in range(self._num_pages):
            if self._done.wait(page_s):
                return
            self._ready += 1
        self._done.set()

    num_pages = property(lambda self: self._num_pages)
    num_ready = property(lambda self: self._ready)
    num_failed = property(lambda self: 0)
    is_done = property(lambda self: self._done.is_set())

    def wait(self, timeout_s=None):
        return self._done.wait(timeout_s)

    def cancel(self):
        self._done.set()

    def poll(self, wait_s):
        if wait_s:
            self.wait(wait_s)
        return Progress(self.num_ready, self.num_pages - self.num_ready, False, self.is_done)


def test_waits_on_a_prefetch_that_pays_and_not_on_one_that_does_not():
    # ~1 ms a page against ~30 ms to recompute one: worth waiting even for late pages.
    fast = model(prefill_us_per_token=1000.0, l3_latency_s=1e-3, l3_gbps=50.0, batch_pages=1)
    ticket = FakeTicket(20, 0.001)
    plan = wait_auto(fast, PROMPT, ticket.poll, 10.0)
    assert ticket.is_done and ticket.num_ready == 20 and plan.num_pages == 20
    slow = model(l3_latency_s=0.05, l3_gbps=0.01, batch_pages=1)
    ticket = FakeTicket(20, 0.05)
    started = time.monotonic()
    plan = wait_auto(slow, PROMPT, ticket.poll, 10.0)
    assert plan.num_pages == 0 and time.monotonic() - started < 0.04
    ticket.cancel()


def test_a_write_prior_that_reads_belie_is_not_waited_on_for_long():
    # Writes said 1 ms a batch (a disk writing into its page cache); the reads are slow:
    # a page every 50 ms. The lookup gives up after twice the predicted wait, with what is
    # ready, instead of waiting up to the break-even point (most of a recompute here).
    m = model(prefill_us_per_token=1000.0, batch_pages=1)
    for _ in range(3):
        m.observe_l3_write(PAGE_BYTES, 1e-3)
    ticket = FakeTicket(20, 0.05)
    plan = wait_auto(m, PROMPT, ticket.poll, 10.0)
    assert plan.is_write_prior
    # The break-even deadline alone would have waited give_up_s (> 0.5 s: 10+ pages).
    assert plan.give_up_s > 0.5 and ticket.num_ready < 5 and not ticket.is_done
    ticket.cancel()


def test_wait_auto_waits_on_the_check_only_for_pages_known_in_l3():
    m = model(l3_latency_s=0.002, l3_gbps=100.0)
    for _ in range(20):
        m.observe_exists(num_asked=10, num_found=0)   # unknown pages: none found lately
    waits: list[float] = []

    def poll_with(known):
        def poll(wait_s):   # checking at first; after any wait the check has answered
            waits.append(wait_s)
            return Progress(8, 48, True, False, known) if len(waits) == 1 else Progress(56, 0, False, True)
        return poll

    assert wait_auto(m, PROMPT, poll_with(0), 10.0).num_pages == 8 and waits == [0.0]
    waits.clear()
    plan = wait_auto(m, PROMPT, poll_with(48), 10.0)
    assert plan.num_pages == 56 and len(waits) == 2 and waits[1] > 0


def test_a_prefetch_wakes_its_waiter_at_each_move():
    # The auto lookup plans again when pages land or the check answers, not only when the
    # predicted wait runs out (a batch that lands early is used at once).
    from controller.pipelines.prefetch import Prefetch

    ticket = Prefetch(["a", "b", "c"], 0)
    seen = ticket.num_moves
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(ticket.wait_for_progress(600.0, seen)))
    waiter.start()
    ticket._num_ready = 2
    ticket._note_progress()   # before or after the waiter's clear: it returns either way
    waiter.join(60.0)
    assert not waiter.is_alive(), "the move did not wake the waiter (it would sleep 600 s)"
    assert got == [seen + 1] and ticket.num_ready == 2 and not ticket.is_done
    # A move the waiter has not seen yet returns at once (no lost wake-up).
    ticket._note_progress()
    assert ticket.wait_for_progress(600.0, seen + 1) == seen + 2
