"""SGLang 0.5.23's own HiCache stack on CPU, one engine rank per ``HiCacheRank``.

Everything here is SGLang's code except the KV bytes: its device pool
(``MHATokenToKVPool`` / ``MLATokenToKVPool``), page allocator, host pool
(``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``) in the layout under test, the
``HostPoolGroup`` its pool assembler builds, and its ``HybridCacheController`` with the
storage backend attached as at launch: ``parse_storage_backend_extra_config`` of the
README's JSON, then ``StorageBackendFactory`` ("dynamic") inside ``attach_storage_backend``.
Pages go to kvstore and back through the controller's own threads: ``write_storage`` ->
backup thread -> ``_page_backup``; ``prefetch`` -> prefetch thread ->
``_storage_hit_query``; the hit's host pages -> ``prefetch_buffer`` -> I/O thread ->
``_page_transfer``. Get/set or v1 is chosen by SGLang from ``interface_v1``.

Hybrid models (``mamba=True`` / ``side_pool=PoolName.SWA``): SGLang's ``MambaPoolHost`` or
an SWA MHA host pool joins the ``HostPoolGroup``; backups and prefetches carry the
``PoolTransfer``s the hybrid tree cache's components build, and the staging slots they
allocate once a hit is known (the tree cache itself does not run here).

What stands in for the engine: the KV itself. A page's KV is drawn from its SGLang
page hash (``page_kv``) and written into the host pool where the engine's
device->host copy would put it (no copy kernel runs on CPU); ``read_page`` reads it
back. Both place a page by the axes of SGLang's ``init_kv_buffer`` (``_HOST_AXES``),
written out here independently of ``adapters.sglang.host_layout``."""

from __future__ import annotations

import json
import threading
from typing import Sequence

import torch

import torchvision_stub
from engine_imports import import_engine

import_engine("sglang.srt.mem_cache.hicache_storage")
torchvision_stub.install()
import_engine("sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller")  # the whole stack

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle  # noqa: E402
from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer  # noqa: E402
from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import (  # noqa: E402
    HybridCacheController,
)
from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import build_pool_entry  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host import HostPoolGroup  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.utils import get_storage_hash_str  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402

MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
ALL_LAYOUTS = [(m, False) for m in MHA_LAYOUTS] + [(m, True) for m in MLA_LAYOUTS]

LAYERS, HEADS, HEAD_DIM, PAGE = 3, 2, 8, 4     # MHA: 3 layers, 2 KV heads of 8, 4-token pages
LORA_RANK, ROPE_DIM = 12, 4                    # MLA: one latent row of 16 per token
DEVICE_TOKENS = 64                             # host pool: 2x the device pool (SGLang's ratio)
# Mamba: 2 layers, SSM state 2 heads x 4 x 3 (float32), one conv state 6 x 3 (bfloat16:
# another dtype than the SSM state, as real models' conv states), 8 device state slots.
MAMBA_LAYERS, SSM_SHAPE, CONV_SHAPE, MAMBA_SLOTS = 2, (2, 4, 3), (6, 3), 8
WAIT_S = 120.0                                 # a hang, not a slow box (2 shared cores)

# The axes of one page as SGLang's get_data_page(i, flat=False) slices it from the
# kv_buffer that init_kv_buffer allocates ("_" is a page axis of length 1), and the
# order kvstore stores: layer, kv (K, V; MLA has one latent), token, head, dim.
_HOST_AXES = {
    (False, "layer_first"): "k l t h d",        # kv_buffer [2][L][size][H][D]
    (False, "page_first"): "k t l h d",         # [2][size][L][H][D]
    (False, "page_first_direct"): "k _ l t h d",  # [2][pages][L][P][H][D]
    (False, "page_head"): "k _ h t l d",        # [2][pages][H][P][L][D]
    (True, "layer_first"): "l t h d",           # [L][size][1][D]
    (True, "page_first"): "t l h d",            # [size][L][1][D]
    (True, "page_first_direct"): "_ l t h d",   # [pages][L][P][1][D]
}
_STORED = "l k t h d"


def readme_extra_config(**overrides) -> str:
    """The README's --hicache-storage-backend-extra-config, as a user writes it."""
    config = {"backend_name": "kvstore", "module_path": "adapters.sglang.backend",
              "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
              "kvstore_url": "embedded", "kvstore_host_pool_pages": 64}
    config.update(overrides)
    return json.dumps(config)


def page_hashes(tokens: Sequence[int]) -> list[str]:
    """SGLang's storage page hashes of a prompt's full pages (the keys its controller
    queries; SGLang hands its controller page-aligned token runs)."""
    return get_storage_hash_str(full_pages(tokens), None, page_size=PAGE)


def full_pages(tokens: Sequence[int]) -> list[int]:
    return list(tokens)[: len(tokens) // PAGE * PAGE]


def page_kv(page_hash: str, is_mla: bool) -> torch.Tensor:
    """The KV of one page, ``[layer][kv][token][head][dim]``, drawn from its hash."""
    shape = (LAYERS, 1, PAGE, 1, LORA_RANK + ROPE_DIM) if is_mla else (LAYERS, 2, PAGE, HEADS, HEAD_DIM)
    gen = torch.Generator().manual_seed(int(page_hash[:15], 16))
    return torch.randn(shape, generator=gen)


def _to_host(page: torch.Tensor, axes: str) -> torch.Tensor:
    """A stored-order page rearranged to the host axes ``axes`` (MLA drops the kv axis)."""
    names = axes.split()
    if "k" not in names:
        page = page[:, 0]
        stored = _STORED.replace("k ", "").split()
    else:
        stored = _STORED.split()
    real = [n for n in names if n != "_"]
    out = page.permute(*[stored.index(n) for n in real])
    for i, n in enumerate(names):
        if n == "_":
            out = out.unsqueeze(i)
    return out


def _from_host(native: torch.Tensor, axes: str) -> torch.Tensor:
    names = axes.split()
    for i in reversed(range(len(names))):
        if names[i] == "_":
            native = native.squeeze(i)
    real = [n for n in names if n != "_"]
    stored = _STORED.split() if "k" in real else _STORED.replace("k ", "").split()
    page = native.permute(*[real.index(n) for n in stored])
    return page if "k" in real else page.unsqueeze(1)


class HiCacheRank:
    """One SGLang engine rank's HiCache with the kvstore backend attached."""

    def __init__(self, mem_layout: str, is_mla: bool, extra_config_json: str, *,
                 tp_rank: int = 0, tp_size: int = 1, model_name: str = "tiny-llama",
                 side_pool: PoolName | None = None, mamba: bool = False) -> None:
        """``side_pool``: also give the model a hybrid model's side pool of that name (an
        MHA pool, as SGLang builds for an SWA window). ``mamba``: also a Mamba state pool
        (SGLang's ``MambaPoolHost`` over device state buffers), as for Qwen3-Next."""
        self.mem_layout, self.is_mla = mem_layout, is_mla
        self.axes = _HOST_AXES[(is_mla, mem_layout)]
        self.device_pool = self._device_pool(is_mla)
        self.host_pool = self._host_pool(self.device_pool, mem_layout, is_mla)
        entries = [self._entry(PoolName.KV, self.host_pool, self.device_pool, anchor=True)]
        if side_pool is not None:
            side_device = self._device_pool(False)
            self.side_host = self._host_pool(side_device, mem_layout, False)
            self.side_axes = _HOST_AXES[(False, mem_layout)]
            entries.append(self._entry(side_pool, self.side_host, side_device, anchor=False))
        if mamba:
            self.mamba_host = self._mamba_host_pool(mem_layout)
            entries.append(build_pool_entry(
                name=PoolName.MAMBA, host_pool=self.mamba_host, device_pool=None,
                layer_mapping={i: i for i in range(MAMBA_LAYERS)},
                transfer_layer_id_max=MAMBA_LAYERS, is_anchor=False))
        self.group = HostPoolGroup(entries)
        allocator = PagedTokenToKVPoolAllocator(DEVICE_TOKENS, PAGE, torch.float32, "cpu",
                                                self.device_pool, need_sort=False)
        extra, threshold, *_ = HybridCacheController.parse_storage_backend_extra_config(
            extra_config_json)
        # What SGLang's launcher publishes before building the cache: this rank's place.
        with get_parallel().override(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1,
                                     attn_dcp_size=1, attn_dcp_rank=0):
            self.controller = HybridCacheController(
                allocator, self.group, PAGE, None, threading.Event(), io_backend="direct",
                storage_backend="dynamic", prefetch_threshold=threshold,
                model_name=model_name, storage_backend_extra_config=extra)
        self.backend = self.controller.storage_backend
        self._num_prefetches = 0

    @staticmethod
    def _device_pool(is_mla: bool):
        if is_mla:
            return MLATokenToKVPool(DEVICE_TOKENS, PAGE, torch.float32, LORA_RANK, ROPE_DIM,
                                    LAYERS, "cpu", False)
        return MHATokenToKVPool(DEVICE_TOKENS, PAGE, torch.float32, HEADS, HEAD_DIM, LAYERS,
                                "cpu", False)

    @staticmethod
    def _entry(name: PoolName, host_pool, device_pool, anchor: bool):
        return build_pool_entry(name=name, host_pool=host_pool, device_pool=device_pool,
                                layer_mapping={i: i for i in range(LAYERS)},
                                transfer_layer_id_max=LAYERS, is_anchor=anchor)

    @staticmethod
    def _host_pool(device_pool, mem_layout: str, is_mla: bool):
        info = device_pool.get_device_pool_infos()[0].buffer_info
        common = dict(pin_memory=False, device="cpu", device_capacity_tokens=DEVICE_TOKENS,
                      start_layer=device_pool.start_layer, end_layer=device_pool.end_layer)
        if is_mla:
            return MLATokenToKVPoolHost(info, 2.0, 0, PAGE, mem_layout,
                                        target_layer_num=LAYERS, **common)
        return MHATokenToKVPoolHost(info, 2.0, 0, PAGE, mem_layout, **common)

    @staticmethod
    def _mamba_host_pool(mem_layout: str):
        info = MambaStateBufferInfo(
            temporal=torch.zeros(MAMBA_LAYERS, MAMBA_SLOTS + 1, *SSM_SHAPE),
            conv=(torch.zeros(MAMBA_LAYERS, MAMBA_SLOTS + 1, *CONV_SHAPE, dtype=torch.bfloat16),))
        # SGLang's Mamba host pool is page_first or page_first_direct only.
        layout = mem_layout if mem_layout in ("page_first", "page_first_direct") else "page_first"
        return MambaPoolHost(info, 2.0, 0, device_capacity=MAMBA_SLOTS, pin_memory=False,
                             device="cpu", layout=layout)

    # ---- the engine's side: KV in the host pool ---------------------------------------
    def write_page(self, host_index: int, page: torch.Tensor) -> None:
        """Put a page where SGLang's device->host copy would (``host_index``: its first row)."""
        self.host_pool.get_data_page(host_index, flat=False).copy_(_to_host(page, self.axes))

    def read_page(self, host_index: int) -> torch.Tensor:
        return _from_host(self.host_pool.get_data_page(host_index, flat=False), self.axes).clone()

    def write_state(self, slot: int, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put a Mamba state where SGLang's device->host state copy would (host slot ``slot``)."""
        self.mamba_host.temporal_buffer[slot, :, 0].copy_(state[0])
        self.mamba_host.conv_buffer[0][slot, :, 0].copy_(state[1])

    def read_state(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.mamba_host.temporal_buffer[slot, :, 0].clone(),
                self.mamba_host.conv_buffer[0][slot, :, 0].clone())

    # ---- SGLang's controller loops --------------------------------------------------------
    def write_window_page(self, host_index: int, page: torch.Tensor) -> None:
        """Put an SWA window page in the side (SWA) host pool, as ``write_page`` does."""
        self.side_host.get_data_page(host_index, flat=False).copy_(_to_host(page, self.side_axes))

    def read_window_page(self, host_index: int) -> torch.Tensor:
        native = self.side_host.get_data_page(host_index, flat=False)
        return _from_host(native, self.side_axes).clone()

    def backup_window(self, tokens: Sequence[int], window_pages: int, window_kv) -> int:
        """Cache a prompt's pages with its last ``window_pages`` SWA pages, as the SWA tree
        component backs a node up (host pages of the window, keyed by the node's last hashes,
        TRAILING_PAGES). ``window_kv(page_hash)``: the SWA KV of that page."""
        hashes = page_hashes(tokens)
        host_indices = self.host_pool.alloc(len(hashes) * PAGE)
        for i, h in enumerate(hashes):
            self.write_page(int(host_indices[i * PAGE]), page_kv(h, self.is_mla))
        window = self.side_host.alloc(window_pages * PAGE)
        tail = hashes[-window_pages:]
        for i, h in enumerate(tail):
            self.write_window_page(int(window[i * PAGE]), window_kv(h))
        swa = PoolTransfer(name=PoolName.SWA, host_indices=window, keys=tail,
                           hit_policy=PoolHitPolicy.TRAILING_PAGES)
        op_id = self.controller.write_storage(host_indices, full_pages(tokens), hash_value=hashes,
                                              extra_pools=[swa])
        done = self.controller.ack_backup_queue.get(timeout=WAIT_S)
        assert done.id == op_id
        self.host_pool.free(host_indices)
        self.side_host.free(window)
        self.last_backup = done
        return done.completed_tokens

    def prefetch_window(self, tokens: Sequence[int], window_pages: int):
        """A sliding-window request's prefetch, as the SWA tree component drives it:
        ``window_pages`` placeholder keys, staging pages once the hit is known. Returns
        (tokens loaded, KV host rows, window host rows or None when the window was not loaded)."""
        swa = PoolTransfer(name=PoolName.SWA, keys=["__placeholder__"] * window_pages,
                           hit_policy=PoolHitPolicy.TRAILING_PAGES)
        loaded, rows = self.prefetch(tokens, extra_pools=[swa])
        if not loaded:
            return 0, rows, None
        got = self._last_op.pool_storage_result.extra_pool_hit_pages.get(PoolName.SWA.value, 0)
        return loaded, rows, (swa.host_indices if got == window_pages else None)

    def backup(self, tokens: Sequence[int], state=None) -> int:
        """Cache a prompt's full pages as SGLang does after prefill; tokens backed up.
        ``state``: a hybrid model's Mamba state at the prompt's last full page, backed up
        with it as the Mamba tree component does (one slot, keyed by the node's last page
        hash, TRAILING_PAGES)."""
        hashes = page_hashes(tokens)
        host_indices = self.host_pool.alloc(len(hashes) * PAGE)
        for i, h in enumerate(hashes):
            self.write_page(int(host_indices[i * PAGE]), page_kv(h, self.is_mla))
        extra_pools = slot = None
        if state is not None:
            slot = self.mamba_host.alloc(1)
            self.write_state(int(slot[0]), state)
            extra_pools = [PoolTransfer(name=PoolName.MAMBA, host_indices=slot,
                                        keys=[hashes[-1]], hit_policy=PoolHitPolicy.TRAILING_PAGES)]
        op_id = self.controller.write_storage(host_indices, full_pages(tokens), hash_value=hashes,
                                              extra_pools=extra_pools)
        done = self.controller.ack_backup_queue.get(timeout=WAIT_S)
        assert done.id == op_id
        self.host_pool.free(host_indices)
        self.last_backup = done
        if slot is not None:
            self.mamba_host.free(slot)
        return done.completed_tokens

    def prefetch_hybrid(self, tokens: Sequence[int]):
        """A hybrid request's prefetch, as the Mamba tree component drives it: a placeholder
        MAMBA transfer (TRAILING_PAGES, one key) in the hit query; once the hit is known, one
        host state slot for it (``alloc_prefetch_staging``). Returns (tokens loaded, KV host
        rows, the state loaded or None)."""
        mamba = PoolTransfer(name=PoolName.MAMBA, keys=["__placeholder__"],
                             hit_policy=PoolHitPolicy.TRAILING_PAGES)
        loaded, rows = self.prefetch(tokens, extra_pools=[mamba])
        if not loaded:
            return 0, rows, None
        op = self._last_op
        got = op.pool_storage_result.extra_pool_hit_pages.get(PoolName.MAMBA.value, 0)
        state = self.read_state(int(mamba.host_indices[0])) if got >= 1 else None
        self.mamba_host.free(mamba.host_indices)
        return loaded, rows, state

    def prefetch(self, tokens: Sequence[int], extra_pools=None) -> tuple[int, torch.Tensor]:
        """Look a prompt up in storage and load its hit, as SGLang's prefetch does
        (``extra_pools``: the side-pool transfers a hybrid model's tree cache adds).
        Returns (tokens loaded, the host rows they were loaded into)."""
        self._num_prefetches += 1
        handle = CacheRequestHandle(rid=f"req-{self._num_prefetches}", attempt_id=0)
        op = self.controller.prefetch(handle, full_pages(tokens), extra_pools=extra_pools)
        hit = self.controller.prefetch_hit_queue.get(timeout=WAIT_S)
        assert hit is op
        if op.storage_hit_count == 0:
            return 0, torch.empty(0, dtype=torch.int64)
        op.host_indices = self.host_pool.alloc(op.storage_hit_count)
        for transfer in extra_pools or []:   # the tree cache's side-pool staging slots
            if transfer.name == PoolName.MAMBA:
                transfer.host_indices = self.mamba_host.alloc(1)
            elif transfer.name == PoolName.SWA:
                transfer.host_indices = self.side_host.alloc(len(transfer.keys) * PAGE)
        self._last_op = op
        self.controller.prefetch_buffer.put(op)   # what the tree cache does with a hit
        loaded = 0
        while True:
            ack = self.controller.ack_prefetch_queue.get(timeout=WAIT_S)
            if ack.pool_hits is not None:   # a side pool's load: the radix cache records it
                op.pool_storage_result.update_extra_pool_hit_pages(ack.pool_hits)
            if ack.completed_req:
                return loaded, op.host_indices
            loaded = max(loaded, ack.completed_tokens or 0)

    def close(self) -> None:
        self.controller.detach_storage_backend()
