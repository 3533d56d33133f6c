"""The kvstore namespace of a SGLang engine's pages, from ``HiCacheStorageConfig``.

What makes two engines' pages with one hash differ, and so goes into the namespace:
the model (``model_name``, or ``kvstore_model_id``), the layout (layers of this
pipeline stage, heads, head dim, page size, dtype, MHA or MLA), the tensor-parallel
rank and size for MHA (each rank holds its own heads), the pipeline stage, the
attention context-parallel and decode-context-parallel shards, and a tenant salt.
Not in it: the data-parallel rank (replicas of one model share pages), and for MLA
the TP rank (every rank holds the same latent, so all ranks share one page).
"""

from __future__ import annotations

from typing import Any

from adapters.config import AdapterConfig
from controller.config import ConfigError
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace


def namespace_for(storage_config: Any, layout: KVLayout, config: AdapterConfig) -> KeyNamespace:
    """``storage_config`` is SGLang's ``HiCacheStorageConfig`` (read by attribute)."""
    model = config.model_id or storage_config.model_name
    if not model:
        raise ConfigError("SGLang gave no model_name; set \"kvstore_model_id\" in "
                          "--hicache-storage-backend-extra-config")
    if getattr(storage_config, "should_split_heads", False):
        raise ConfigError("SGLang's split-heads storage (prefill and decode at different TP "
                          "sizes) is not supported by the kvstore backend yet")
    parts = [str(model)]
    for name in ("pp", "attn_cp", "dcp"):
        size = int(getattr(storage_config, f"{name}_size", 1) or 1)
        if size > 1:
            parts.append(f"{name}{int(getattr(storage_config, f'{name}_rank'))}/{size}")
    if layout.is_mla:
        tp_rank, tp_size = 0, 1
    else:
        tp_rank, tp_size = int(storage_config.tp_rank), int(storage_config.tp_size)
    return KeyNamespace("|".join(parts), layout, tp_rank=tp_rank, tp_size=tp_size,
                        cache_salt=config.cache_salt)
