"""Layer-by-layer load of host pages into the engine's device pool.

A load is planned once (``CopyBackend.plan_layers``: checks, index and run arrays of
every layer) and then launched a layer at a time.

On CUDA the launches are issued by a background thread (``LayerIssuer``), one layer
after another on a side stream, with an event after each; ``load()`` returns once the
work is queued, so the engine thread spends no time issuing copies. ``wait_layer(i)``
blocks the host only until launch i has been enqueued (it is usually long done), then
makes the engine's current stream wait on event i, so layer i+1 moves while layer i's
attention runs::

    engine thread:  load() --queue--> wait_layer(0) ....... wait_layer(1) ......
    issuer thread:           launch 0, record e0, launch 1, record e1, ... e31
    side stream:    [after the engine's prior work] copy 0 | copy 1 | ... | copy 31
    engine stream:  ....... wait e0, attention 0, wait e1, attention 1, ...

Elsewhere (CPU, and devices without streams here) a layer is copied when it is first
waited on, which keeps the same contract: a layer is in the pool once its wait returns.

Fencing (``kvstore.slot_fence``): a load made with a fence checks, once a copy is over,
that its slots kept the generations they had when leased. On CPU that is after each
layer's copy, so ``wait_layer`` raises LoadError before the engine reads a page whose
slot was reused; on CUDA a layer's copy is still running when its wait returns, so the
verdict comes from ``verify()`` (after the last copy completed). Either way every layer
of every page is copied before LoadError is raised, so the pages before the first bad
one are whole and only the rest need recomputing.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from controller.api import CacheError, LoadError, LoadHandle
from kvstore.copy_ops import LayerCopyPlan
from kvstore.slot_fence import SlotFence


class ControllerLoad(LoadHandle):
    """A load the controller can end when its lease is released."""

    _is_finished = False
    _lost_reason: str | None = None
    _num_pages = 0

    def finish(self) -> None:
        """Return once nothing reads the source slots any more; later waits raise."""
        self._is_finished = True

    def abandon(self, reason: str) -> None:
        """End the load because its lease is gone without a release (the daemon lost the
        session): like ``finish``, but later waits raise LoadError for every page."""
        self.finish()
        self._lost_reason = reason

    def _check_live(self) -> None:
        if self._lost_reason is not None:
            raise LoadError(f"this load's lease is gone ({self._lost_reason}): recompute its pages",
                            range(max(1, self._num_pages)))
        if self._is_finished:
            raise CacheError("this load's lease was released; lookup() and load() again")


def _fence_error(fence: SlotFence | None) -> LoadError | None:
    """LoadError naming the pages whose slots changed owner, or None if all kept theirs."""
    bad = fence.bad_positions() if fence is not None else []
    if not bad:
        return None
    return LoadError(f"{len(bad)} loaded page(s) lost their host slot to another writer during "
                     f"the copy (first: page {bad[0]}); recompute from page {bad[0]}", bad)


class CompletedLoad(ControllerLoad):
    """A load with nothing to move (no hit pages)."""

    def wait_layer(self, layer: int) -> None:
        self._check_live()

    def wait_all(self) -> None:
        self._check_live()


class LazyLayerLoad(ControllerLoad):
    """Copies layers in order on the caller's thread as they are waited on; with a fence,
    checks after each copy that no slot changed owner."""

    def __init__(self, plan: LayerCopyPlan, fence: SlotFence | None = None, num_pages: int = 0) -> None:
        self._plan = plan
        self._num_layers = plan.num_layers
        self._num_done = 0
        self._fence = fence
        self._num_pages = num_pages
        self._error: LoadError | None = None

    def wait_layer(self, layer: int) -> None:
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"layer must be in [0, {self._num_layers}), got {layer}")
        self._check_live()  # after release the slots may hold another page
        if self._error is None:
            self._copy_through(layer)
            self._error = _fence_error(self._fence)
            if self._error is not None:
                self._copy_through(self._num_layers - 1)  # the good pages must be whole
        if self._error is not None:
            raise self._error

    def _copy_through(self, layer: int) -> None:
        while self._num_done <= layer:
            self._plan.launch(self._num_done)
            self._num_done += 1

    def wait_all(self) -> None:
        self.wait_layer(self._num_layers - 1)


class LayerIssuer:
    """One daemon thread that runs issue jobs in order (one DevicePool's loads).

    Jobs only enqueue device work, so they are short; a job never raises out of the
    thread (each job reports its own errors)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvstore-layer-issuer", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        """Run the queued jobs, then stop the thread. Idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        # The current device is per thread: launches must target the pool's device.
        torch.cuda.set_device(self._device)
        while (job := self._jobs.get()) is not None:
            job()


class CudaStreamLoad(ControllerLoad):
    """Layers launched by a ``LayerIssuer`` on a side stream, one event per layer."""

    def __init__(self, plan: LayerCopyPlan, stream: torch.cuda.Stream, issuer: LayerIssuer,
                 fence: SlotFence | None = None, num_pages: int = 0) -> None:
        self._plan = plan
        self._stream = stream
        self._fence = fence
        self._num_pages = num_pages
        self._verdict: LoadError | None = None
        self._is_verified = False
        num_layers = plan.num_layers
        self._events = [torch.cuda.Event() for _ in range(num_layers)]
        # The side stream must not start before the engine's writes to the pool that
        # precede this load (e.g. freed pages being reused) are done.
        self._start = torch.cuda.Event()
        self._start.record(torch.cuda.current_stream(stream.device))
        self._cond = threading.Condition()
        self._num_issued = 0      # events[:num_issued] are recorded
        self._is_cancelled = False
        self._is_issuing = True   # the issuer has not left this load yet
        self._error: BaseException | None = None
        issuer.submit(self._issue)

    def _issue(self) -> None:
        """On the issuer thread: launch every layer unless cancelled; never raises."""
        try:
            self._stream.wait_event(self._start)
            for layer, event in enumerate(self._events):
                if self._is_cancelled:
                    break
                self._plan.launch(layer, self._stream)
                event.record(self._stream)
                with self._cond:
                    self._num_issued = layer + 1
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the engine thread's next wait
            self._error = exc
        finally:
            with self._cond:
                self._is_issuing = False
                self._cond.notify_all()

    def wait_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self._events):
            raise ValueError(f"layer must be in [0, {len(self._events)}), got {layer}")
        self._check_live()
        with self._cond:
            while self._num_issued <= layer and self._is_issuing:
                self._cond.wait()
            if self._num_issued <= layer:
                raise CacheError(f"loading layer {layer} failed: {self._error!r}") from self._error
        torch.cuda.current_stream(self._stream.device).wait_event(self._events[layer])

    def wait_all(self) -> None:
        self.wait_layer(len(self._events) - 1)

    def verify(self) -> None:
        """Block until the last layer's copy has completed, then check the fence (once)."""
        self.wait_all()
        if not self._is_verified:
            self._events[-1].synchronize()
            self._verdict = _fence_error(self._fence)
            self._is_verified = True
        if self._verdict is not None:
            raise self._verdict

    def finish(self) -> None:
        """Stop issuing (layers not launched yet never will be), then block until the
        launched ones have finished reading the slots."""
        with self._cond:
            self._is_cancelled = True
            while self._is_issuing:
                self._cond.wait()
            num_issued = self._num_issued
        if self._error is not None:
            # A launch that raised may have enqueued part of its layer: drain the stream.
            self._stream.synchronize()
        elif num_issued:
            self._events[num_issued - 1].synchronize()
        super().finish()
