"""The cache controller: policies, transfers and the client API engines use.

    from controller import connect
    cache = connect(ControllerConfig(...), namespace, engine.kv_pool)

Today ``connect`` returns an in-process (embedded) controller; the daemon's
client library will serve the same CacheClient interface.
"""

from __future__ import annotations

import torch

from controller.api import CacheClient, CacheError, LoadHandle, LookupResult, StoreResult
from controller.config import ConfigError, ControllerConfig, L3Config
from kvstore.page_keys import KeyNamespace


def connect(config: ControllerConfig, namespace: KeyNamespace, device_pool: torch.Tensor) -> CacheClient:
    """A cache client for one engine's device pool (embedded mode)."""
    from controller.embedded import EmbeddedController

    return EmbeddedController(config, namespace, device_pool)


__all__ = [
    "CacheClient", "CacheError", "ConfigError", "ControllerConfig", "L3Config",
    "LoadHandle", "LookupResult", "StoreResult", "connect",
]
