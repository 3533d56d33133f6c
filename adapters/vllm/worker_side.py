"""The worker side of the vLLM connector: a step's loads and saves against one worker's KV.

One step, in vLLM's call order::

    start_loads(plan)      lease each load's pages; one layer-by-layer load handle each
    wait_layer(name)       layer i of every load is in vLLM's blocks (or the load failed)
    save_layer(name)       slots reserved at the first layer; layer i of the new pages written
    finish_step()          verify loads, release leases; commit saves (abort the tainted)
    take_load_errors()     vLLM blocks that hold no trustworthy KV: vLLM recomputes them

A load fails when pages left the cache between the scheduler's lookup and the
worker's (fewer hit pages), when the cache went stale (``CacheError``: every page
of the load), or when a wait or ``verify()`` raises ``LoadError`` (from its
``first_bad_page``, counted from the load's first page; the pages before it stay
good, so their later layers are still loaded). Those blocks are reported, and so is
every save this step whose pages use a reported block: their KV was computed over
wrong context, so they are aborted, never committed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from adapters.keyed import KeyedCache, KeyedLease, KeyedReservation
from adapters.vllm.kv_views import host_layer_view
from adapters.vllm.plan import PageTransfer, StepPlan
from controller.api import CacheError, LoadError
from controller.load_handle import ControllerLoad, CudaStreamLoad, LayerIssuer, LazyLayerLoad
from kvstore.copy_ops import LayerCopyPlan
from kvstore.page_keys import PageKey
from kvstore.slot_fence import SlotFence

log = logging.getLogger(__name__)
KeysOf = Callable[[PageTransfer], list[PageKey]]


@dataclass
class _Load:
    transfer: PageTransfer
    lease: KeyedLease
    handle: ControllerLoad
    is_failed: bool = False


class WorkerTransfers:
    """One worker's loads and saves. ``views[i]`` is layer i as ``kv_views.page_view`` makes it."""

    def __init__(self, cache: KeyedCache, keys_of: KeysOf, names: list[str],
                 views: list[torch.Tensor]) -> None:
        self._cache, self._keys_of = cache, keys_of
        self._layer_of = {name: i for i, name in enumerate(names)}
        self._views = views
        self._kernel_tokens = views[0].shape[3]
        self._loads: list[_Load] = []
        self._saves: list[tuple[PageTransfer, KeyedReservation]] | None = None
        self._errors: set[int] = set()
        self._issuer: LayerIssuer | None = None   # launches CUDA loads off the engine thread
        self._load_wait_s = 0.0                   # host time wait_layer blocked, since taken

    @property
    def device(self) -> torch.device:
        return self._views[0].device

    def take_load_wait_s(self) -> float:
        """Host seconds ``wait_layer`` blocked since the last call (the step timer's)."""
        waited, self._load_wait_s = self._load_wait_s, 0.0
        return waited

    def layer(self, name: str) -> int:
        try:
            return self._layer_of[name]
        except KeyError:
            raise ValueError(f"layer {name} was not registered with register_kv_caches") from None

    # ---- loads ------------------------------------------------------------------------
    def start_loads(self, plan: StepPlan) -> None:
        """Lease each load's pages and start a layer-by-layer load into vLLM's blocks."""
        for t in plan.loads:
            lease = self._cache.lookup_keys(self._keys_of(t))
            n = min(lease.num_hit_pages, t.num_pages)
            if n < t.num_pages:                         # evicted since the scheduler looked
                self._report(t, max(n, t.first_page))
            if n <= t.first_page:
                self._cache.release_keys(lease)
                continue
            try:
                self._cache.check_fresh()
                handle = self._layer_load(lease, t.first_page, n, t.block_ids[t.first_page:n])
            except CacheError as exc:
                log.warning("kvstore load of request %s not started: %s", t.req_id, exc)
                self._report(t, t.first_page)
                self._cache.release_keys(lease)
                continue
            self._loads.append(_Load(t, lease, handle))

    def _layer_load(self, lease: KeyedLease, first: int, end: int, blocks) -> ControllerLoad:
        """Pages [first, end) of the lease into ``blocks``, fenced: a slot that changes
        owner before its copy is over makes a wait or ``verify()`` raise LoadError, with
        page indices counted from ``first``."""
        slots = lease.slots[first:end]
        fence = SlotFence(self._cache.generations, slots, lease.generations[first:end])
        host = host_layer_view(self._cache.host_tensor, self._kernel_tokens)
        plan = _SlotsToLayerViews(host, self._views, slots, blocks)
        device = self._views[0].device
        if device.type == "cuda":
            if self._issuer is None:
                self._issuer = LayerIssuer(device)
            return CudaStreamLoad(plan, torch.cuda.Stream(device), self._issuer, fence, len(slots))
        return LazyLayerLoad(plan, fence, len(slots))

    def wait_layer(self, name: str) -> None:
        layer = self.layer(name)
        started = time.perf_counter()
        for load in self._loads:
            if not load.is_failed:
                self._guard(load, lambda: load.handle.wait_layer(layer))
        self._load_wait_s += time.perf_counter() - started

    def _guard(self, load: _Load, wait: Callable[[], None]) -> None:
        """Run a wait. A LoadError marks the load's blocks from its first bad page on, and
        the load goes on (the pages before it are good and need their later layers); any
        other CacheError ends the load and marks all of its blocks."""
        t = load.transfer
        try:
            wait()
        except LoadError as exc:
            log.warning("kvstore load of request %s failed from page %d: %s", t.req_id,
                        t.first_page + exc.first_bad_page, exc)
            self._report(t, t.first_page + exc.first_bad_page)
        except CacheError as exc:
            log.warning("kvstore load of request %s failed: %s", t.req_id, exc)
            load.is_failed = True
            self._report(t, t.first_page)

    def _report(self, t: PageTransfer, first_bad_page: int) -> None:
        self._errors.update(t.block_ids[first_bad_page:])

    # ---- saves ------------------------------------------------------------------------
    def save_layer(self, name: str, plan: StepPlan) -> None:
        """Write this layer of the step's new pages into slots reserved at the first call
        (nothing is visible before ``finish_step`` commits)."""
        layer = self.layer(name)
        if self._saves is None:
            self._saves = [(t, self._cache.begin_store_keys(self._keys_of(t))) for t in plan.saves]
        view = self._views[layer]
        host = host_layer_view(self._cache.host_tensor, self._kernel_tokens)
        for t, res in self._saves:
            # Every absent page of the chain is written, also one before first_page that
            # left the cache since an earlier step stored it (its block still holds its KV).
            if res.slots:
                blocks = torch.tensor([t.block_ids[p] for p in res.positions], device=view.device)
                host[torch.tensor(res.slots), layer] = view[blocks].to("cpu")

    def finish_step(self) -> None:
        """Verify and end the loads; commit the saves, abort those over reported blocks."""
        for load in self._loads:
            if not load.is_failed:
                self._guard(load, load.handle.verify)
            load.handle.finish()
            self._cache.release_keys(load.lease)
        self._loads = []
        saves, self._saves = self._saves or [], None
        if saves and self._views[0].is_cuda:
            torch.cuda.current_stream(self._views[0].device).synchronize()
        for t, res in saves:
            if self._errors.intersection(t.block_ids):
                self._cache.abort_store_keys(res)
                continue
            try:
                self._cache.check_fresh()
                self._cache.commit_store_keys(res)
            except CacheError as exc:   # a lost store is a later miss, never an error
                log.warning("kvstore store of request %s dropped: %s", t.req_id, exc)
                self._cache.abort_store_keys(res)

    def take_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def close(self) -> None:
        if self._issuer is not None:
            self._issuer.close()


class _SlotsToLayerViews(LayerCopyPlan):
    """kvstore slots -> vLLM's per-layer caches, one layer per launch (torch indexing:
    vLLM's caches are strided views per layer, which the pool-to-pool backends do not take)."""

    def __init__(self, host: torch.Tensor, views: list[torch.Tensor], slots, blocks) -> None:
        self._host, self._views = host, views
        self._slots, self._blocks = torch.tensor(list(slots)), torch.tensor(list(blocks))
        self.num_layers, self.num_pages = len(views), len(self._slots)

    def launch(self, layer: int, stream=None) -> None:
        self._check_layer(layer)
        view = self._views[layer]
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            src = self._host[self._slots, layer]
            view[self._blocks.to(view.device)] = src.to(view.device, non_blocking=stream is not None)
