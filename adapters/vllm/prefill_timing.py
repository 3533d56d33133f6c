"""The engine's prefill rate, measured on the vLLM worker for the cache's ``auto`` policy.

The ``auto`` policy weighs loading (or waiting for) cached pages against recomputing
them, so it needs the engine's prefill rate (``KeyedCache.report_prefill``). vLLM has
no per-request prefill timer a connector can read, so the worker times whole steps::

    bind_connector_metadata   begin: the step's plan says which prompt chunks it computes
    ... the forward ...
    wait_for_save             end
    build_connector_worker_meta   the finished samples -> the scheduler side, which
                                  reports them to its cache (update_connector_output)

Only a step that computes exactly one prompt chunk is a sample (two chunks in one step
cannot be told apart); decode tokens in the same step count toward it (a decode token
costs a small fraction of a chunk's tokens). On CUDA the step is timed with events on
the current stream, read once they have completed (never a synchronize), so the time is
the GPU's, including any part of a load the layer-wise overlap did not hide; on CPU it is
wall time less what ``wait_layer`` blocked (the copy of the loaded pages).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from adapters.vllm.plan import StepPlan


@dataclass(frozen=True)
class PrefillSample:
    """One step that computed ``num_tokens`` prompt tokens of one request over a prefix of
    ``num_cached``, in ``seconds``."""

    req_id: str
    num_tokens: int
    num_cached: int
    seconds: float


def merge_samples(a: list[PrefillSample], b: list[PrefillSample]) -> list[PrefillSample]:
    """Samples of several workers (TP ranks) for the same steps: the slowest rank bounds
    the step, so one sample per chunk with the longest time."""
    merged: dict[tuple[str, int], PrefillSample] = {}
    for s in [*a, *b]:
        key = (s.req_id, s.num_cached)
        if key not in merged or s.seconds > merged[key].seconds:
            merged[key] = s
    return list(merged.values())


class StepTimer:
    """Times the steps that compute exactly one prompt chunk (module doc)."""

    _MAX_PENDING = 64   # steps whose CUDA events have not completed; older ones are dropped

    def __init__(self, device: torch.device) -> None:
        self._is_cuda = device.type == "cuda"
        self._device = device
        self._open: tuple | None = None
        self._pending: deque[tuple] = deque(maxlen=self._MAX_PENDING)

    def begin(self, plan: StepPlan) -> None:
        self._open = None
        if len(plan.prefills) != 1 or plan.prefills[0].num_tokens <= 0:
            return
        chunk = plan.prefills[0]
        if self._is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self._device))
            self._open = (chunk, start)
        else:
            self._open = (chunk, time.perf_counter())

    def end(self, load_wait_s: float) -> None:
        """The step's forward is over (``wait_for_save``); ``load_wait_s``: host time
        ``wait_layer`` blocked in it (subtracted on CPU, where it is the copy itself)."""
        if self._open is None:
            return
        chunk, start = self._open
        self._open = None
        if self._is_cuda:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record(torch.cuda.current_stream(self._device))
            self._pending.append((chunk, start, stop))
        else:
            seconds = time.perf_counter() - start - load_wait_s
            if seconds > 0:
                self._pending.append((chunk, seconds))

    def take(self) -> list[PrefillSample]:
        """The samples measured since the last call (CUDA: those whose events completed)."""
        done = []
        while self._pending:
            entry = self._pending[0]
            if self._is_cuda:
                chunk, start, stop = entry
                if not stop.query():
                    break   # in stream order: the later ones are not done either
                seconds = start.elapsed_time(stop) / 1e3
            else:
                chunk, seconds = entry
            self._pending.popleft()
            if seconds > 0:
                done.append(PrefillSample(chunk.req_id, chunk.num_tokens, chunk.num_cached, seconds))
        return done
