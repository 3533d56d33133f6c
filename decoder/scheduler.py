"""Scheduler: a waiting queue and concurrent sessions over one ReferenceEngine.

Compute is single-threaded: one step at a time, either one prefill chunk (a
page) of the one request being prefilled, or the admission of a request (its
lookup and load start), or one decode token of one running request. Between
steps the caller submits arrivals and hints, so a prefetch starts within a
chunk's time of its arrival. L3 reads run meanwhile in the background, inside
the cache::

    submit(request)     arrival: the request joins the waiting queue and, unless the
                        policy is ``sync``, cache.prefetch(prompt) starts its L3 reads
    step()              the next prefill chunk; else the oldest waiting request that the
                        admission policy admits (and whose pages fit the device pool) is
                        admitted (lookup + load); else one running request decodes one
                        token (round robin). Prefill goes first: it is what TTFT waits on
    take_completed()    finished requests, with their timings

Admission policies (by name, the same names as the cache's ``PrefetchConfig.policy``)::

    sync           no prefetch at arrival; admit at once (lookup reads L3 itself)
    best_effort    prefetch at arrival; admit at once (lookup uses what has arrived)
    wait_complete  prefetch at arrival; admit once the prefetch is done, running
                   other requests meanwhile
    timeout        prefetch at arrival; admit once it is done or the budget
                   base_s + per_1k_tokens_s * prompt_len / 1000 since arrival has passed
    auto           prefetch at arrival; admit at once; the lookup waits for the prefetch
                   as long as the cache's cost model says it pays, and loads the pages
                   it chose (see AutoAdmission)

Prefill recomputes only what the lookup did not find (the engine's page-chunked
prefill), so output is bit-exact whatever was loaded.

Agent hints: ``pause(session)`` when a session waits on a tool call or an RL
rollout is preempted; its queued requests are held back (a running one
finishes) and a hint prefetch of it is cancelled. Device pages are never kept
for a paused session: a request frees its pages when it finishes, and its KV
stays in L2/L3. ``resume(session)`` lets its requests run again and starts
cache.prefetch of the session's context (last prompt + output, or the tokens
given), so its pages are back in L2 when the next turn arrives.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from controller.api import CacheError, PrefetchTicket

from .engine import EngineError, GenerationResult, ReferenceEngine, RunningRequest

_POLL_S = 0.002  # longest single wait on one ticket in idle_wait, so others are seen too


class SchedulerError(RuntimeError):
    """A request or hint cannot be taken; the message says why."""


@dataclass(eq=False)
class Request:
    """One LLM call of a session: the whole prompt, and how many tokens to generate."""

    session: Hashable
    prompt: Sequence[int] | np.ndarray
    max_new_tokens: int
    arrival_s: float | None = None
    """Clock time the request arrived (None: when ``submit`` is called). TTFT counts from it."""
    tag: object = None
    """Caller's label, returned with the completion."""


@dataclass(eq=False)
class Completion:
    """A finished request and when each of its stages happened (scheduler clock, seconds)."""

    request: Request
    result: GenerationResult
    arrival_s: float
    admitted_s: float
    """When its prefill began (lookup included)."""
    first_token_s: float
    finished_s: float
    num_prefetch_pages: int = 0
    """Pages its prefetch (arrival or hint) was reading from L3, at admission."""
    num_prefetch_ready: int = 0
    """Of those, pages already in L2 at admission."""

    @property
    def ttft_s(self) -> float:
        """Arrival -> first token: queue wait, lookup, load and prefill."""
        return self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.admitted_s - self.arrival_s


@dataclass(eq=False)
class _Waiting:
    request: Request
    prompt: list[int]
    arrival_s: float
    ticket: PrefetchTicket | None


@dataclass(eq=False)
class _Running:
    waiting: _Waiting
    state: RunningRequest
    admitted_s: float
    first_token_s: float
    prefetch: tuple[int, int] = (0, 0)


@dataclass
class _Session:
    context: list[int] = field(default_factory=list)
    """Last prompt + its output: the prefix of the session's next turn."""
    is_paused: bool = False
    hint: PrefetchTicket | None = None


# ---- admission policies -------------------------------------------------------------
class AdmissionPolicy(ABC):
    """When a waiting request may start its prefill. Changes nothing; ``deadline_s`` tells
    an idle scheduler when the answer may change without any prefetch finishing."""

    name: str
    starts_prefetch: bool = True

    @abstractmethod
    def is_admissible(self, waiting: _Waiting, now_s: float) -> bool: ...

    def deadline_s(self, waiting: _Waiting) -> float | None:
        return None


class SyncAdmission(AdmissionPolicy):
    name, starts_prefetch = "sync", False

    def is_admissible(self, waiting: _Waiting, now_s: float) -> bool:
        return True


class BestEffortAdmission(AdmissionPolicy):
    name = "best_effort"

    def is_admissible(self, waiting: _Waiting, now_s: float) -> bool:
        return True


class WaitCompleteAdmission(AdmissionPolicy):
    name = "wait_complete"

    def is_admissible(self, waiting: _Waiting, now_s: float) -> bool:
        return waiting.ticket is None or waiting.ticket.is_done


class TimeoutAdmission(AdmissionPolicy):
    name = "timeout"

    def __init__(self, base_s: float = 0.002, per_1k_tokens_s: float = 0.001) -> None:
        if base_s < 0 or per_1k_tokens_s < 0:
            raise SchedulerError(f"timeout budget must be >= 0, got {base_s}, {per_1k_tokens_s}")
        self.base_s, self.per_1k_tokens_s = base_s, per_1k_tokens_s

    def deadline_s(self, waiting: _Waiting) -> float:
        return waiting.arrival_s + self.base_s + self.per_1k_tokens_s * len(waiting.prompt) / 1000

    def is_admissible(self, waiting: _Waiting, now_s: float) -> bool:
        ticket = waiting.ticket
        return ticket is None or ticket.is_done or now_s >= self.deadline_s(waiting)


class AutoAdmission(AdmissionPolicy):
    """Admits at once; the lookup then waits for the prefetch only as long as the cache's
    cost model says it pays (``PrefetchConfig.policy = "auto"``), else recomputes.

    Deferring a request until its prefetch is done (``wait_complete``, or polling
    ``CacheClient.worth_waiting_s``) costs it its place: the requests admitted meanwhile
    run their prefills first, back to back. On the pipeline bench that cost more than
    the short waits the cost model accepts (auto admitted by ``worth_waiting_s`` had
    wait_complete's queueing), so the choice is left to the lookup."""

    name = "auto"

    def is_admissible(self, waiting: _Waiting, now_s: float) -> bool:
        return True


ADMISSION_POLICIES: dict[str, type[AdmissionPolicy]] = {
    cls.name: cls for cls in (SyncAdmission, BestEffortAdmission, WaitCompleteAdmission, TimeoutAdmission,
                              AutoAdmission)
}


def admission_policy(name: str, **options: float) -> AdmissionPolicy:
    """The policy ``name`` (see the module doc); ``timeout`` takes base_s and per_1k_tokens_s."""
    if name not in ADMISSION_POLICIES:
        raise SchedulerError(f"admission policy {name!r} is unknown; use one of {sorted(ADMISSION_POLICIES)}")
    return ADMISSION_POLICIES[name](**options)


# ---- the scheduler ----------------------------------------------------------------------
class Scheduler:
    """Waiting queue + running requests over one engine; see the module doc. Not thread-safe."""

    def __init__(self, engine: ReferenceEngine, policy: AdmissionPolicy | str = "best_effort",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine = engine
        self.policy = admission_policy(policy) if isinstance(policy, str) else policy
        self.clock = clock
        self._waiting: list[_Waiting] = []
        self._running: deque[_Running] = deque()
        self._prefilling: _Running | None = None
        """The one request whose prefill is under way (one chunk per step)."""
        self._completed: list[Completion] = []
        self._sessions: dict[Hashable, _Session] = {}
        self.num_prefetch_refused = 0
        """prefetch calls the cache refused (CacheError): those requests wait on nothing."""

    # ---- state --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests admitted and not finished (prefilling or decoding)."""
        return len(self._running) + (self._prefilling is not None)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._prefilling)

    def is_paused(self, session: Hashable) -> bool:
        return session in self._sessions and self._sessions[session].is_paused

    def take_completed(self) -> list[Completion]:
        """Completions since the last call, in the order they finished."""
        done, self._completed = self._completed, []
        return done

    # ---- requests and hints -------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request`` and, unless the policy is ``sync``, start prefetching its prompt.
        Raises EngineError for a request the engine can never run (too long, bad tokens)."""
        prompt = self.engine.check_request(request.prompt, request.max_new_tokens)
        need = self.engine.num_pages_for(len(prompt), request.max_new_tokens)
        if need > self.engine.allocator.num_pages:
            raise EngineError(f"request needs {need} device pages, the pool has "
                              f"{self.engine.allocator.num_pages}; raise num_device_pages")
        arrival = self.clock() if request.arrival_s is None else request.arrival_s
        ticket = self._try_prefetch(prompt) if self.policy.starts_prefetch else None
        self._sessions.setdefault(request.session, _Session())
        self._waiting.append(_Waiting(request, prompt, arrival, ticket))

    def pause(self, session: Hashable) -> None:
        """The session waits (tool call, preempted rollout): hold its queued requests back
        and cancel its hint prefetch. Its KV stays in L2/L3; a running request finishes."""
        state = self._sessions.setdefault(session, _Session())
        state.is_paused = True
        if state.hint is not None:
            state.hint.cancel()
            state.hint = None

    def resume(self, session: Hashable, tokens: Sequence[int] | np.ndarray | None = None) -> None:
        """The session will be back soon: let its requests run and prefetch ``tokens`` (by
        default its context: the last prompt and output) from L3 into L2. Never waits on L3."""
        state = self._sessions.setdefault(session, _Session())
        state.is_paused = False
        context = state.context if tokens is None else [int(t) for t in np.asarray(tokens).reshape(-1)]
        if context and self.engine.cache is not None:
            state.hint = self._try_prefetch(context)

    def _try_prefetch(self, tokens: list[int]) -> PrefetchTicket | None:
        if self.engine.cache is None:
            return None
        try:
            return self.engine.cache.prefetch(tokens)
        except CacheError:
            self.num_prefetch_refused += 1
            return None

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> bool:
        """Do one unit of work: the next prefill chunk of the request being prefilled; else
        admit one waiting request (its lookup and load start); else one decode token of one
        running request. Returns False when nothing can run now."""
        if self._prefilling is not None:
            self._prefill_one()
            return True
        waiting = self._next_admissible(self.clock())
        if waiting is not None:
            self._admit(waiting)
            return True
        if self._running:
            self._decode_one()
            return True
        return False

    def run_until_idle(self, max_idle_s: float = 60.0) -> list[Completion]:
        """Step until nothing waits or runs; returns the completions. Raises SchedulerError if
        only paused sessions' requests are left, or nothing could run for ``max_idle_s``."""
        idle_since = None
        while self.has_work:
            if self.step():
                idle_since = None
                continue
            if not self.num_running and all(self.is_paused(w.request.session) for w in self._waiting):
                raise SchedulerError("only requests of paused sessions are left; resume them")
            now = self.clock()
            idle_since = now if idle_since is None else idle_since
            if now - idle_since > max_idle_s:
                raise SchedulerError(f"no request could run for {max_idle_s} s")
            self.idle_wait(now + 0.05)
        return self.take_completed()

    def idle_wait(self, until_s: float) -> None:
        """Block (not spin) until ``until_s`` at the latest, returning early when a prefetch
        that a waiting request depends on may have finished or a timeout budget runs out."""
        now = self.clock()
        deadlines = [d for w in self._waiting if (d := self.policy.deadline_s(w)) is not None]
        until_s = min([until_s, *deadlines])
        pending = [w.ticket for w in self._waiting if w.ticket is not None and not w.ticket.is_done]
        if pending:
            pending[0].wait(max(0.0, min(until_s - now, _POLL_S)))
        elif until_s > now:
            time.sleep(until_s - now)

    def _next_admissible(self, now_s: float) -> _Waiting | None:
        """The oldest waiting request the policy admits, if its pages fit the pool now.
        A request that does not fit blocks the younger ones (no starvation of long prompts)."""
        for waiting in self._waiting:
            if self.is_paused(waiting.request.session) or not self.policy.is_admissible(waiting, now_s):
                continue
            need = self.engine.num_pages_for(len(waiting.prompt), waiting.request.max_new_tokens)
            return waiting if need <= self.engine.allocator.num_free else None
        return None

    def _admit(self, waiting: _Waiting) -> None:
        self._waiting.remove(waiting)
        admitted = self.clock()
        prefetch = self._prefetch_progress(waiting)
        state = self.engine.start(waiting.prompt, waiting.request.max_new_tokens, clock=self.clock)
        self._prefilling = _Running(waiting, state, admitted, float("nan"), prefetch)

    def _prefill_one(self) -> None:
        running = self._prefilling
        try:
            is_prefilled = self.engine.prefill_step(running.state)
        except BaseException:
            self._prefilling = None
            self.engine.abort(running.state)
            raise
        if not is_prefilled:
            return
        self._prefilling = None
        running.first_token_s = running.state.first_token_at
        if running.state.is_finished:
            self._finish(running)
        else:
            self._running.append(running)

    def _prefetch_progress(self, waiting: _Waiting) -> tuple[int, int]:
        """(pages, ready pages) of the request's prefetch, else of its session's hint."""
        hint = self._sessions[waiting.request.session].hint
        ticket = waiting.ticket if waiting.ticket is not None else hint
        return (ticket.num_pages, ticket.num_ready) if ticket is not None else (0, 0)

    def _decode_one(self) -> None:
        running = self._running.popleft()
        try:
            self.engine.decode_step(running.state)
        except BaseException:
            self.engine.abort(running.state)
            raise
        if running.state.is_finished:
            self._finish(running)
        else:
            self._running.append(running)

    def _finish(self, running: _Running) -> None:
        result = self.engine.finish(running.state)
        waiting = running.waiting
        session = self._sessions[waiting.request.session]
        session.context = waiting.prompt + result.tokens
        self._completed.append(Completion(waiting.request, result, waiting.arrival_s,
                                          running.admitted_s, running.first_token_s, self.clock(),
                                          *running.prefetch))
