"""KVStoreConnector: kvstore behind vLLM 0.33.0's ``KVConnectorBase_V1``.

vLLM runs one connector object per role, usually in different processes:

- scheduler (``adapters.vllm.scheduler_side``): ``get_num_new_matched_tokens`` asks
  the cache how many pages beyond vLLM's own prefix-cache hit it holds (keys from
  token ids and multimodal hashes, in TP rank 0 / PP stage 0's namespace). With
  ``kvstore_async_lookup`` the lookup (which reads L3 pages up into L2) runs on a
  thread and the answer is ``None`` ("ask again") until it is done.
  ``update_state_after_alloc`` / ``build_connector_meta`` turn hits and newly
  computed prompt pages into a ``StepPlan`` for the workers.
- worker (``adapters.vllm.worker_side``): owns the KV caches (``register_kv_caches``,
  one strided ``[B, H, N, C]`` view per layer, read through ``adapters.vllm.kv_views``).
  ``start_load_kv`` leases the pages and makes one layer-by-layer load per request;
  ``wait_for_layer_load`` waits on a layer; ``save_kv_layer`` writes a layer of the
  step's new pages into reserved slots; ``wait_for_save`` verifies loads and commits.
  Pages that could not be loaded are reported by ``get_block_ids_with_load_errors``;
  vLLM recomputes them only with ``"kv_load_failure_policy": "recompute"`` in the
  ``--kv-transfer-config`` (its default, "fail", ends such requests with an error).

The per-layer hooks run inside the attention layers, which a full CUDA graph
replays without Python: ``requires_piecewise_for_cudagraph`` is True, so vLLM
switches full CUDA graphs to piecewise ones. The connector does not support vLLM's
hybrid KV cache manager (one KV cache group only); vLLM turns it off for it.
Embedded mode (``kvstore_url: "embedded"``) keeps the cache in the process: both
roles share it only when they run in one process; use the daemon otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from adapters.config import AdapterConfig
from adapters.keyed import KeyedCache, open_keyed_cache
from adapters.keys import dtype_name
from adapters.vllm.keys import transfer_keys, vllm_namespace
from adapters.vllm.kv_views import attention_backend_name, check_spec, kv_split_of, page_view
from adapters.vllm.plan import PageTransfer, StepPlan
from adapters.vllm.prefill_timing import PrefillSample, StepTimer, merge_samples
from adapters.vllm.scheduler_side import StepPlanner
from adapters.vllm.worker_side import WorkerTransfers
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan


@dataclass
class KVStorePrefillTimes(KVConnectorWorkerMetadata):
    """Worker -> scheduler: the prefill steps the worker timed (``prefill_timing``)."""

    samples: list[PrefillSample]

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, KVStorePrefillTimes):
            return self
        return KVStorePrefillTimes(merge_samples(self.samples, other.samples))


def layout_from_vllm(vllm_config: Any, extra: dict) -> KVLayout:
    """The layout of one worker's pages: ``kvstore_layout`` in the extra config, else read
    from vLLM's model config (this PP stage's layers, KV heads per TP rank, head size, dtype)."""
    block_size = int(vllm_config.cache_config.block_size)
    given = extra.get("kvstore_layout")
    if given:
        return KVLayout(page_size=block_size, arrangement="page_first", **dict(given))
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto":
        raise ValueError(f"kvstore stores unquantized KV only; --kv-cache-dtype is {cache_dtype} "
                         "(use auto)")
    is_mla = bool(getattr(mc, "use_mla", False))
    return KVLayout(num_layers=mc.get_num_layers(pc), page_size=block_size,
                    num_kv_heads=1 if is_mla else mc.get_num_kv_heads(pc),
                    head_dim=mc.get_head_size(), dtype=dtype_name(mc.dtype),
                    arrangement="page_first", is_mla=is_mla)


def _parallel_ranks(vllm_config: Any, extra: dict) -> tuple[int, int]:
    """(TP rank, PP stage) of this worker; (0, 0) without process groups (one process)."""
    tp, pp = extra.get("kvstore_tp_rank"), extra.get("kvstore_pp_rank")
    if tp is None or pp is None:
        from vllm.distributed import parallel_state as ps

        if ps.model_parallel_is_initialized():
            tp = ps.get_tensor_model_parallel_rank() if tp is None else tp
            pp = ps.get_pp_group().rank_in_group if pp is None else pp
    return int(tp or 0), int(pp or 0)


class KVStoreConnector(KVConnectorBase_V1):
    """See the module docstring. One instance per role."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = AdapterConfig.from_extra(extra)
        self.layout = layout_from_vllm(vllm_config, extra)
        self.block_size = self.layout.page_size
        model_id = self.config.model_id or getattr(vllm_config.model_config, "model", None)
        pc = vllm_config.parallel_config
        tp_rank, pp_rank = (0, 0) if role == KVConnectorRole.SCHEDULER else _parallel_ranks(vllm_config, extra)
        self.namespace = vllm_namespace(
            str(model_id), self.layout, tp_rank=tp_rank, tp_size=int(pc.tensor_parallel_size),
            pp_rank=pp_rank, pp_size=int(pc.pipeline_parallel_size), cache_salt=self.config.cache_salt)
        self._cache: KeyedCache = open_keyed_cache(self.config, self.layout)
        self._planner = StepPlanner(self._cache, self.block_size, self._keys,
                                    bool(extra.get("kvstore_async_lookup", False)))
        self._worker: WorkerTransfers | None = None
        self._timer: StepTimer | None = None
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        if role == KVConnectorRole.SCHEDULER and policy != "recompute":
            log.warning("kvstore: kv_load_failure_policy is %r, so a request whose pages leave "
                        "the cache between lookup and load ends with an error; set "
                        '"kv_load_failure_policy": "recompute" in --kv-transfer-config', policy)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Always: loads and saves run per layer inside attention (see module doc)."""
        return True

    def _keys(self, t: PageTransfer) -> list[bytes]:
        return transfer_keys(self.namespace, t, self.block_size)

    # ==== scheduler side ==========================================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond vLLM's local hit that the cache holds; ``(None, False)``: ask again."""
        return self._planner.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        self._planner.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KVStoreConnectorMetadata(self._planner.build(scheduler_output))

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' prefill timings go to this side's cache: its lookups choose (``auto``)."""
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVStorePrefillTimes):
            self._planner.report_prefills(meta.samples)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forget the request; its blocks may be freed at once (saves commit within the step)."""
        self._planner.finished(request.request_id)
        return False, None

    # ==== worker side =============================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer views (``allocate_kv_cache``); ValueError names what kvstore
        cannot store (backend, quantization, shape, layer count)."""
        names = list(kv_caches)
        if len(names) != self.layout.num_layers:
            raise ValueError(f"vLLM registered {len(names)} KV layers; the kvstore layout says "
                             f"{self.layout.num_layers}")
        self._check_kv_cache_config()
        split = kv_split_of(attention_backend_name(self._vllm_config, names), self.layout.is_mla)
        views = [page_view(kv_caches[n], self.layout, split, n) for n in names]
        self._worker = WorkerTransfers(self._cache, self._keys, names, views)
        self._timer = StepTimer(self._worker.device)

    def _check_kv_cache_config(self) -> None:
        groups = getattr(self._kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ValueError(f"kvstore supports one KV cache group, vLLM made {len(groups)}: "
                             "run without the hybrid KV cache manager "
                             "(--disable-hybrid-kv-cache-manager)")
        if groups:
            check_spec(groups[0].kv_cache_spec, self.layout)

    def _transfers(self) -> WorkerTransfers:
        if self._worker is None:
            raise RuntimeError("the KV caches are not registered: vLLM calls register_kv_caches "
                               "before the first step")
        return self._worker

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KVStoreConnectorMetadata) else StepPlan()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._timer is not None:   # the step's forward follows: time it (prefill_timing)
            self._timer.begin(self._plan())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._transfers().start_loads(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._transfers().wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._transfers().save_layer(layer_name, self._plan())

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.finish_step()
            self._timer.end(self._worker.take_load_wait_s())

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        samples = self._timer.take() if self._timer is not None else []
        return KVStorePrefillTimes(samples) if samples else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        self._planner.close()
        if self._worker is not None:
            self._worker.close()
        self._cache.close()
