"""DevicePool: the engine's KV pool as the cache client sees it -- page-id checks and
the L1<->L2 copies, the same for the embedded controller and the daemon's client.

Both directions are planned once per call (``CopyBackend.plan_layers``). On CUDA:

- ``load`` hands the per-layer launches to a background issuer (``CudaStreamLoad``);
- ``start_save`` enqueues the device-to-host copy on a write stream after the engine's
  work so far and returns a ``SaveCopy`` at once; the engine's current stream waits for
  the copy, so the engine may reuse the saved pages as soon as the call returns (its
  later kernels run after the copy on the GPU; its host thread is not held). The caller
  publishes the slots only once ``SaveCopy.is_done()``.

On CPU both are synchronous.

The host side is anything with ``tensor`` and ``layout`` (a ``HostPool``, or the
client's mapping of the daemon's segment): the copies only need the bytes.
"""

from __future__ import annotations

import numbers
from typing import Protocol, Sequence

import torch

from controller.api import CacheError
from controller.load_handle import CompletedLoad, ControllerLoad, CudaStreamLoad, LayerIssuer, LazyLayerLoad
from kvstore.copy_ops import CopyBackend, copy_backend_for
from kvstore.layout import KVLayout
from kvstore.slot_fence import SlotFence


class HostPages(Protocol):
    """Page slots in host memory, page_first (``HostPool`` and the client's mapping)."""

    tensor: torch.Tensor
    layout: KVLayout


class SaveCopy:
    """One device-to-host copy of ``DevicePool.start_save``: the host slots hold the pages
    once ``is_done()`` (then for good)."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event | None) -> None:
        self._event = event  # None: the copy was synchronous

    def is_done(self) -> bool:
        """True once the copy has completed; never blocks."""
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Block the host until the copy has completed."""
        if self._event is not None:
            self._event.synchronize()


class DevicePool:
    """One engine's paged KV pool, with the copy backend chosen for its device."""

    def __init__(self, layout: KVLayout, tensor: torch.Tensor, copy_backend: str | CopyBackend | None) -> None:
        """``copy_backend``: a backend name for ``copy_backend_for`` (None: the device's
        default), or a backend instance (e.g. a CudaCopyBackend with its own policy)."""
        self.layout = layout
        self.num_pages = layout.check_pool(tensor, "device pool")
        self.tensor = tensor
        self._copy = (copy_backend if isinstance(copy_backend, CopyBackend)
                      else copy_backend_for(tensor.device, copy_backend))
        self._stream = torch.cuda.Stream(tensor.device) if tensor.is_cuda else None
        self._write_stream = torch.cuda.Stream(tensor.device) if tensor.is_cuda else None
        self._issuer = LayerIssuer(tensor.device) if tensor.is_cuda else None

    def check_pages(self, pages: Sequence[int], what: str) -> list[int]:
        """``pages`` as a list of ints, or CacheError naming the first bad entry: each
        must be an int (not a float or bool), inside the pool, and named once."""
        try:
            out = list(pages)
        except TypeError:
            raise CacheError(f"{what} must be a sequence of device page ids, got "
                             f"{type(pages).__name__}") from None
        for i, page in enumerate(out):
            if isinstance(page, bool) or not isinstance(page, numbers.Integral):
                raise CacheError(f"{what}[{i}] is {page!r} ({type(page).__name__}); device page "
                                 "ids must be ints")
            if not 0 <= page < self.num_pages:
                raise CacheError(f"{what}[{i}] = {page} is outside the engine pool of "
                                 f"{self.num_pages} pages (valid ids: 0..{self.num_pages - 1})")
        out = [int(p) for p in out]
        if len(set(out)) != len(out):
            seen: set[int] = set()
            dup = next(p for p in out if p in seen or seen.add(p))
            raise CacheError(f"{what} names device page {dup} twice; each page holds one "
                             "page of tokens")
        return out

    def load(self, host: HostPages, slots: Sequence[int], pages: list[int],
             fence: SlotFence | None = None) -> ControllerLoad:
        """Start copying host ``slots`` into device ``pages``, layer by layer (see
        ``controller.load_handle``). Every check runs here; the launches do not run on
        the calling thread on CUDA. ``fence``: the generations the slots had when leased,
        checked once the copies are over (a reused slot is a LoadError, never silent)."""
        if not pages:
            return CompletedLoad()
        plan = self._copy.plan_layers(host.tensor, host.layout, list(slots), self.tensor, self.layout, pages)
        if self._stream is not None:
            return CudaStreamLoad(plan, self._stream, self._issuer, fence, len(pages))
        return LazyLayerLoad(plan, fence, len(pages))

    def start_save(self, pages: list[int], host: HostPages, slots: Sequence[int]) -> SaveCopy:
        """Start copying device ``pages`` into host ``slots``; see the module docstring for
        the ordering on CUDA. The slots must not be read (or published) before the
        returned copy ``is_done()``."""
        plan = self._copy.plan_layers(self.tensor, self.layout, pages, host.tensor, host.layout, list(slots))
        if self._write_stream is None:
            plan.launch_all()
            return SaveCopy(None)
        current = torch.cuda.current_stream(self.tensor.device)
        self._write_stream.wait_stream(current)  # read the pages after the engine wrote them
        plan.launch_all(self._write_stream)
        done = torch.cuda.Event()
        done.record(self._write_stream)
        current.wait_event(done)  # the engine's later writes to these pages run after the copy
        return SaveCopy(done)

    def save(self, pages: list[int], host: HostPages, slots: Sequence[int]) -> SaveCopy:
        """Copy device ``pages`` into host ``slots``; returns once the bytes are there."""
        copy = self.start_save(pages, host, slots)
        copy.wait()
        return copy

    def close(self) -> None:
        """Stop the background issuer (after the loads queued on it). Idempotent."""
        if self._issuer is not None:
            self._issuer.close()
