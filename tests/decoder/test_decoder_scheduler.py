"""Scheduler: the waiting queue, admission by policy, concurrent sessions, pause/resume hints,
and the central property -- output through the scheduler equals generate() without a cache,
bit for bit, whatever the policy and whatever the prefetch had read."""

import pytest
import torch
from decoder_fakes import FakeCache, make_engine, random_tokens

from controller.api import CacheError, PrefetchTicket
from decoder import EngineError
from decoder.scheduler import (
    ADMISSION_POLICIES, Request, Scheduler, SchedulerError, TimeoutAdmission, admission_policy,
)

P = 8


class FakeTicket(PrefetchTicket):
    def __init__(self, num_pages: int) -> None:
        self._num_pages, self._is_done, self.is_cancelled = num_pages, False, False

    num_pages = property(lambda self: self._num_pages)
    num_ready = property(lambda self: self._num_pages if self._is_done else 0)
    num_failed = property(lambda self: 0)
    is_done = property(lambda self: self._is_done or self.is_cancelled)

    def finish(self) -> None:
        self._is_done = True

    def wait(self, timeout_s=None) -> bool:
        return self.is_done

    def cancel(self) -> None:
        self.is_cancelled = True


class PrefetchingFakeCache(FakeCache):
    """FakeCache whose prefetch hands out tickets the test finishes by hand."""

    def __init__(self, layout, pool) -> None:
        super().__init__(layout, pool)
        self.tickets: list[FakeTicket] = []

    def prefetch(self, tokens):
        self.calls.append(("prefetch", len(tokens)))
        self.tickets.append(FakeTicket(len(tokens) // self.layout.page_size))
        return self.tickets[-1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler_with(policy, num_pages=64, cache_cls=PrefetchingFakeCache):
    engine = make_engine(P, num_pages)
    cache = cache_cls(engine.layout, engine.kv_pool) if cache_cls else None
    engine.attach_cache(cache)
    clock = FakeClock()
    return Scheduler(engine, policy, clock=clock), cache, clock


def drain(scheduler, limit=10_000):
    for _ in range(limit):
        if not scheduler.step():
            return scheduler.take_completed()
    raise AssertionError("scheduler did not go idle")


# ---- admission ----------------------------------------------------------------------
def test_policies_by_name_and_unknown_name():
    assert sorted(ADMISSION_POLICIES) == ["auto", "best_effort", "sync", "timeout", "wait_complete"]
    assert admission_policy("timeout", base_s=0.5).base_s == 0.5
    with pytest.raises(SchedulerError, match="unknown; use one of"):
        admission_policy("eager")


def test_sync_does_not_prefetch_and_admits_in_arrival_order():
    sched, cache, _ = scheduler_with("sync")
    for i in range(3):
        sched.submit(Request(f"s{i}", random_tokens(20 + i, i), 3))
    done = drain(sched)
    assert "prefetch" not in cache.call_names()
    assert [c.request.session for c in done] == ["s0", "s1", "s2"]


def test_best_effort_admits_at_once_while_the_prefetch_runs():
    sched, cache, _ = scheduler_with("best_effort")
    sched.submit(Request("a", random_tokens(24, 0), 2))
    assert cache.call_names() == ["prefetch"] and not cache.tickets[0].is_done
    assert sched.step()  # admitted: lookup and load; prefill chunks follow, one a step
    assert sched.num_running == 1 and cache.call_names()[1:] == ["lookup"]
    while "store" not in cache.call_names():
        assert sched.step()
    assert cache.call_names()[-2:] == ["store", "release"]


def test_wait_complete_runs_other_requests_until_the_prefetch_is_done():
    sched, cache, clock = scheduler_with("wait_complete")
    sched.submit(Request("slow", random_tokens(24, 0), 2))
    sched.submit(Request("fast", random_tokens(16, 1), 2))
    assert not sched.step()  # neither prefetch is done: nothing to run
    cache.tickets[1].finish()
    done = drain(sched)
    assert [c.request.session for c in done] == ["fast"] and sched.num_waiting == 1
    clock.now += 1.0
    cache.tickets[0].finish()
    done = drain(sched)
    assert [c.request.session for c in done] == ["slow"]
    assert done[0].queue_s == pytest.approx(1.0)


def test_timeout_admits_after_its_budget_even_if_the_prefetch_is_not_done():
    policy = TimeoutAdmission(base_s=0.010, per_1k_tokens_s=1.0)  # 10 ms + 1 ms per token
    sched, cache, clock = scheduler_with(policy)
    sched.submit(Request("a", random_tokens(40, 0), 1))
    assert not sched.step()
    clock.now += 0.049
    assert not sched.step()
    clock.now += 0.002  # past 10 + 40 ms
    assert sched.step() and sched.num_running == 1  # admitted: lookup and load
    assert len(drain(sched)) == 1
    assert not cache.tickets[0].is_done


def test_refused_prefetch_waits_on_nothing():
    sched, _, _ = scheduler_with("wait_complete", cache_cls=FakeCache)  # prefetch raises CacheError
    sched.submit(Request("a", random_tokens(20, 0), 2))
    assert sched.num_prefetch_refused == 1
    assert len(drain(sched)) == 1


def test_a_request_that_does_not_fit_waits_for_pages_and_blocks_younger_ones():
    sched, _, _ = scheduler_with("sync", num_pages=6)
    sched.submit(Request("a", random_tokens(30, 0), 4))  # 5 pages
    sched.submit(Request("b", random_tokens(30, 1), 4))  # 5 more: waits until a is done
    sched.submit(Request("c", random_tokens(3, 2), 2))   # 1 page would fit, but b is older
    for _ in range(1 + 4 + 3):  # a: admission, 4 prefill chunks, 3 decode steps; b, c wait
        assert sched.step() and sched.num_waiting == 2
    assert [c.request.session for c in sched.take_completed()] == ["a"]
    assert sched.step() and sched.num_running == 1 and sched.num_waiting == 1  # b before c
    done = drain(sched)  # c fits beside b and, with fewer tokens to decode, ends first
    assert [c.request.session for c in done] == ["c", "b"]
    sched.engine.allocator.check_integrity()
    assert sched.engine.allocator.num_free == 6
    with pytest.raises(EngineError, match="the pool has 6"):
        sched.submit(Request("d", random_tokens(60, 3), 1))


def test_decode_steps_of_running_requests_interleave():
    sched, _, clock = scheduler_with("sync", cache_cls=None)
    sched.submit(Request("a", random_tokens(10, 0), 4))
    sched.submit(Request("b", random_tokens(12, 1), 4))
    for _ in range(2 + 2 + 2):  # admission and 2 chunks each: prefill goes before decode
        assert sched.step()
    assert sched.num_running == 2 and all(r.state.is_prefilled for r in sched._running)
    done = drain(sched)
    assert [c.request.session for c in done] == ["a", "b"]
    assert all(c.first_token_s <= c.finished_s and c.ttft_s >= 0 for c in done)


# ---- hints -----------------------------------------------------------------------------
def test_pause_holds_requests_back_and_resume_prefetches_the_context():
    sched, cache, _ = scheduler_with("best_effort")
    prompt = random_tokens(20, 0)
    sched.submit(Request("a", prompt, 3))
    first = drain(sched)[0]
    sched.pause("a")
    assert sched.is_paused("a")
    sched.submit(Request("a", prompt + first.result.tokens + random_tokens(5, 1), 2))
    sched.submit(Request("b", random_tokens(9, 2), 2))
    assert [c.request.session for c in drain(sched)] == ["b"]  # a is held back
    with pytest.raises(SchedulerError, match="paused"):
        sched.run_until_idle()
    cache.calls.clear()
    sched.resume("a")
    assert cache.calls == [("prefetch", 23)]  # prompt + 3 output tokens
    assert [c.request.session for c in drain(sched)] == ["a"]


def test_pause_cancels_the_hint_prefetch():
    sched, cache, _ = scheduler_with("best_effort")
    sched.resume("a", random_tokens(32, 0))
    sched.pause("a")
    assert cache.tickets[0].is_cancelled


def test_resume_without_a_cache_or_a_context_does_nothing():
    sched, cache, _ = scheduler_with("best_effort")
    sched.resume("new")
    assert cache.calls == []


# ---- exactness ---------------------------------------------------------------------------
def interleaved_sessions(sched, plain, policy_finisher=None, turns=3, sessions=3):
    """Sessions over a shared system prompt, turns interleaved, each next turn built on the
    session's output. Every completion is checked against plain.generate (no cache)."""
    system = random_tokens(33, 99)
    history = {s: list(system) for s in range(sessions)}
    num_checked = 0
    for turn in range(turns):
        for s in range(sessions):
            sched.submit(Request(s, history[s] + random_tokens(7 + 5 * s + turn, turn * 10 + s), 3 + s))
        if policy_finisher is not None:
            policy_finisher()
        for c in sched.run_until_idle():
            expected = plain.generate(c.request.prompt, c.request.max_new_tokens)
            assert c.result.tokens == expected.tokens
            assert torch.equal(c.result.logits, expected.logits)
            history[c.request.session] = list(c.request.prompt) + c.result.tokens
            num_checked += 1
    return num_checked


@pytest.mark.parametrize("policy", sorted(ADMISSION_POLICIES))
def test_output_through_the_scheduler_equals_generate_without_cache(policy):
    sched, cache, clock = scheduler_with(policy, num_pages=96)
    plain = make_engine(P, 64)

    def finish_prefetches():
        clock.now += 1.0  # timeout: budgets pass
        for t in cache.tickets:
            t.finish()

    assert interleaved_sessions(sched, plain, finish_prefetches) == 9
    assert any(c[0] == "load" for c in cache.calls)
