"""KVStoreConnector: kvstore behind vLLM's ``KVConnectorBase_V1``.

vLLM runs one connector object per role, usually in different processes:

- scheduler: ``get_num_new_matched_tokens`` asks the cache how many leading pages
  of the prompt it holds (keys from token ids, ``kvstore.page_keys``, in TP rank 0's
  namespace). With ``kvstore_async_lookup`` the lookup (which reads L3 pages up into
  L2) runs on a thread and the answer is ``None`` ("ask again") until it is done.
  ``update_state_after_alloc`` / ``build_connector_meta`` turn hits and newly
  computed prompt pages into a ``StepPlan`` for the workers.
- worker: owns the KV caches (``register_kv_caches``, one tensor per layer).
  ``start_load_kv`` leases the pages and makes one kvstore load handle per request
  (``controller.load_handle``: on CUDA each layer's copy is enqueued on a side stream
  with an event; on CPU a layer is copied when first waited on);
  ``wait_for_layer_load`` waits on that layer. ``save_kv_layer`` writes each layer
  of the step's new pages into slots reserved at its first call (two-phase store:
  nothing is visible yet); ``wait_for_save`` commits them. Pages a worker could not
  load are reported by ``get_block_ids_with_load_errors`` and vLLM recomputes them.

Supported KV cache shapes per layer: ``[2, num_blocks, P, H, D]`` (FlashAttention
style, MHA/GQA) and ``[num_blocks, P, D]`` (MLA). Embedded mode (``kvstore_url:
"embedded"``) keeps the cache in the process: both roles share it only when they
run in one process (tests, single-process serving); use the daemon otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from adapters.config import AdapterConfig
from adapters.keyed import KeyedCache, KeyedLease, KeyedReservation, open_keyed_cache
from adapters.vllm.plan import PageTransfer, StepPlan
from controller.load_handle import ControllerLoad, CudaStreamLoad, LayerIssuer, LazyLayerLoad
from kvstore.copy_ops import LayerCopyPlan
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, page_keys

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan


def _layout_from_vllm(vllm_config: Any, extra: dict) -> KVLayout:
    """The layout of one worker's pages: ``kvstore_layout`` in the extra config, else
    read from vLLM's model config (layers, KV heads per TP rank, head size, cache dtype)."""
    block_size = int(vllm_config.cache_config.block_size)
    given = extra.get("kvstore_layout")
    if given:
        return KVLayout(page_size=block_size, arrangement="page_first", **dict(given))
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    from adapters.keys import dtype_name

    is_mla = bool(getattr(mc, "use_mla", False))
    return KVLayout(num_layers=mc.get_num_layers(pc), page_size=block_size,
                    num_kv_heads=1 if is_mla else mc.get_num_kv_heads(pc),
                    head_dim=mc.get_head_size(), dtype=dtype_name(mc.dtype),
                    arrangement="page_first", is_mla=is_mla)


def _tp_rank(vllm_config: Any, extra: dict) -> int:
    if "kvstore_tp_rank" in extra:
        return int(extra["kvstore_tp_rank"])
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - no TP group (single process, tests): rank 0
        return 0


class KVStoreConnector(KVConnectorBase_V1):
    """See the module docstring. One instance per role; not shared between threads
    except through the cache handle, which is thread-safe."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = AdapterConfig.from_extra(extra)
        self.layout = _layout_from_vllm(vllm_config, extra)
        self.block_size = self.layout.page_size
        model_id = self.config.model_id or getattr(vllm_config.model_config, "model", None)
        tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        rank = 0 if role == KVConnectorRole.SCHEDULER or self.layout.is_mla else _tp_rank(vllm_config, extra)
        self.namespace = KeyNamespace(str(model_id), self.layout, tp_rank=rank,
                                      tp_size=1 if self.layout.is_mla else tp_size,
                                      cache_salt=self.config.cache_salt)
        self._cache: KeyedCache = open_keyed_cache(self.config, self.layout)
        # scheduler state
        self._async = bool(extra.get("kvstore_async_lookup", False))
        self._lookups: dict[str, Future] = {}
        self._executor = ThreadPoolExecutor(1, "kvstore-lookup") if self._async else None
        self._pending_loads: dict[str, PageTransfer] = {}
        self._num_saved_pages: dict[str, int] = {}
        self._requests: dict[str, "Request"] = {}
        self._block_ids: dict[str, list[int]] = {}
        # worker state
        self._layers: list[str] = []
        self._views: list[torch.Tensor] = []
        self._loads: list[tuple[KeyedLease, ControllerLoad]] = []
        self._issuer: LayerIssuer | None = None   # launches CUDA loads off the engine thread
        self._saves: list[tuple[PageTransfer, KeyedReservation]] | None = None
        self._load_errors: set[int] = set()

    # ---- keys --------------------------------------------------------------------------------
    def _keys(self, t: PageTransfer | Any, token_ids) -> list[bytes]:
        ns = self.namespace
        lora, salt = getattr(t, "lora_id", None), getattr(t, "cache_salt", None)
        if lora or salt:
            ns = replace(ns, lora_id=lora, cache_salt=salt or ns.cache_salt)
        return page_keys(ns.digest(), list(token_ids), self.block_size)

    @staticmethod
    def _request_ids(request: "Request") -> tuple[str | None, str | None]:
        lora = getattr(request, "lora_request", None)
        return (getattr(lora, "lora_name", None) if lora else None), getattr(request, "cache_salt", None)

    # ==== scheduler side ==========================================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the cache holds, whole pages only, never
        the prompt's last token (vLLM must compute it). ``(None, False)``: ask again."""
        prompt = list(request.prompt_token_ids or [])
        num_pages = max(len(prompt) - 1, 0) // self.block_size
        if num_pages * self.block_size <= num_computed_tokens:
            return 0, False
        lora, salt = self._request_ids(request)
        probe = PageTransfer(request.request_id, (), (), 0, lora, salt)
        keys = self._keys(probe, prompt[: num_pages * self.block_size])
        if self._executor is not None:
            future = self._lookups.get(request.request_id)
            if future is None:
                self._lookups[request.request_id] = self._executor.submit(self._cache.count_cached, keys)
                return None, False
            if not future.done():
                return None, False
            num_hit = self._lookups.pop(request.request_id).result()
        else:
            num_hit = self._cache.count_cached(keys)
        return max(num_hit * self.block_size - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        """Remember the blocks that the cache's pages go to (loaded in the next step)."""
        self._requests[request.request_id] = request
        if num_external_tokens <= 0:
            return
        P = self.block_size
        skip = request.num_computed_tokens // P
        num_pages = (request.num_computed_tokens + num_external_tokens) // P
        block_ids = blocks.get_block_ids()[0]
        lora, salt = self._request_ids(request)
        # The load's pages are cached already: the save plan starts after them.
        self._num_saved_pages[request.request_id] = num_pages
        self._pending_loads[request.request_id] = PageTransfer(
            request.request_id, tuple(request.prompt_token_ids[: num_pages * P]),
            tuple(block_ids[:num_pages]), skip, lora, salt)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        """This step's loads, and saves of the prompt pages the step completes."""
        plan = StepPlan(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        P = self.block_size
        steps = [(r.req_id, r.block_ids[0], r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            steps.append((req_id, None, cached.num_computed_tokens[i]))
        for req_id, block_ids, num_computed in steps:
            request = self._requests.get(req_id)
            if request is None:
                continue
            if block_ids is not None:
                self._block_ids[req_id] = list(block_ids)
            end = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            num_pages = min(end, len(request.prompt_token_ids)) // P
            first = self._num_saved_pages.get(req_id, 0)
            blocks = self._block_ids.get(req_id, [])
            if num_pages <= first or len(blocks) < num_pages:
                continue
            lora, salt = self._request_ids(request)
            plan.saves.append(PageTransfer(req_id, tuple(request.prompt_token_ids[: num_pages * P]),
                                           tuple(blocks[:num_pages]), first, lora, salt))
            self._num_saved_pages[req_id] = num_pages
        return KVStoreConnectorMetadata(plan)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forget the request; its blocks may be freed at once (saves are synchronous per step)."""
        for table in (self._requests, self._num_saved_pages, self._block_ids, self._pending_loads):
            table.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        return False, None

    # ==== worker side =============================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Page views ``[block][kv][token][head][dim]`` of each layer's cache, in layer order."""
        self._layers = list(kv_caches)
        if len(self._layers) != self.layout.num_layers:
            raise ValueError(f"vLLM registered {len(self._layers)} KV layers; the kvstore layout "
                             f"says {self.layout.num_layers}")
        self._views = [self._page_view(kv_caches[name], name) for name in self._layers]

    def _page_view(self, kv: torch.Tensor, name: str) -> torch.Tensor:
        L = self.layout
        if L.is_mla and kv.dim() == 3:
            view = kv.unsqueeze(1).unsqueeze(3)                   # [N, 1, P, 1, D]
        elif not L.is_mla and kv.dim() == 5 and kv.shape[0] == 2:
            view = kv.permute(1, 0, 2, 3, 4)                      # [2, N, P, H, D] -> [N, 2, P, H, D]
        else:
            raise ValueError(f"KV cache of layer {name} has shape {tuple(kv.shape)}; supported: "
                             "[2, blocks, P, H, D] (MHA) and [blocks, P, D] (MLA)")
        if tuple(view.shape[1:]) != (L.num_kv, L.page_size, L.num_kv_heads, L.head_dim):
            raise ValueError(f"KV cache of layer {name} has shape {tuple(kv.shape)}, which does not "
                             f"match the kvstore layout {L.fingerprint()}")
        return view

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KVStoreConnectorMetadata) else StepPlan()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Lease each load's pages and start a layer-by-layer load into vLLM's blocks."""
        for t in self._plan().loads:
            lease = self._cache.lookup_keys(self._keys(t, t.token_ids))
            n = min(lease.num_hit_pages, t.num_pages)
            if n < t.num_pages:
                self._load_errors.update(t.block_ids[max(n, t.first_page):])
            if n <= t.first_page:
                self._cache.release_keys(lease)
                continue
            slots, blocks = lease.slots[t.first_page:n], t.block_ids[t.first_page:n]
            self._cache.check_fresh()
            self._loads.append((lease, self._layer_load(slots, blocks)))

    def _layer_load(self, slots, blocks) -> ControllerLoad:
        plan = _SlotsToLayerViews(self._cache.host_tensor, self._views, slots, blocks)
        device = self._views[0].device if self._views else torch.device("cpu")
        if device.type == "cuda":
            if self._issuer is None:
                self._issuer = LayerIssuer(device)
            return CudaStreamLoad(plan, torch.cuda.Stream(device), self._issuer)
        return LazyLayerLoad(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._loads:
            return
        layer = self._layers.index(layer_name)
        for _, handle in self._loads:
            handle.wait_layer(layer)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Write this layer of the step's new pages into reserved slots (reserved at the
        first layer; committed by ``wait_for_save``)."""
        if self._saves is None:
            self._saves = []
            for t in self._plan().saves:
                keys = self._keys(t, t.token_ids)
                self._saves.append((t, self._cache.begin_store_keys(keys)))
        layer = self._layers.index(layer_name)
        view, host = self._views[layer], self._cache.host_tensor
        for t, res in self._saves:
            # Every absent page of the chain is written, also one before first_page that
            # was evicted since an earlier step stored it (its block still holds its KV).
            if res.slots:
                blocks = torch.tensor([t.block_ids[p] for p in res.positions], device=view.device)
                host[torch.tensor(res.slots), layer] = view[blocks].to("cpu")

    def wait_for_save(self) -> None:
        """End this step: loads are complete and their leases released; saves committed."""
        for lease, handle in self._loads:
            handle.wait_all()
            handle.finish()
            self._cache.release_keys(lease)
        self._loads = []
        saves, self._saves = self._saves or [], None
        if saves and self._views and self._views[0].is_cuda:
            torch.cuda.current_stream(self._views[0].device).synchronize()
        for _, res in saves:
            self._cache.check_fresh()
            self._cache.commit_store_keys(res)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._cache.close()


class _SlotsToLayerViews(LayerCopyPlan):
    """kvstore slots (page_first) -> vLLM's per-layer caches, one layer per launch
    (torch indexing: vLLM's caches are one tensor per layer, which the pool-to-pool
    copy backends do not take)."""

    def __init__(self, host: torch.Tensor, views: list[torch.Tensor], slots, blocks) -> None:
        self._host, self._views = host, views
        self._slots, self._blocks = torch.tensor(list(slots)), torch.tensor(list(blocks))
        self.num_layers, self.num_pages = len(views), len(self._slots)

    def launch(self, layer: int, stream: Any = None) -> None:
        self._check_layer(layer)
        view = self._views[layer]
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            src = self._host[self._slots, layer]
            view[self._blocks.to(view.device)] = src.to(view.device, non_blocking=stream is not None)
