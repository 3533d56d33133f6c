"""The cache controller: policies, transfers and the client API engines use.

    from controller import connect
    cache = connect(ControllerConfig(...), namespace, engine.kv_pool)

``connect`` returns an in-process (embedded) controller; ``connect_daemon``
attaches to a ``kvstore serve`` daemon and returns a client with the same
CacheClient interface::

    cache = connect_daemon("ipc:///run/user/1000/kvstore/kvstore.sock", namespace, engine.kv_pool)
"""

from __future__ import annotations

import torch

from controller.api import CacheClient, CacheError, LoadError, LoadHandle, LookupResult, StoreResult
from controller.config import ConfigError, ControllerConfig, L3Config
from kvstore.page_keys import KeyNamespace


def connect(config: ControllerConfig, namespace: KeyNamespace, device_pool: torch.Tensor) -> CacheClient:
    """A cache client for one engine's device pool (embedded mode)."""
    from controller.embedded import EmbeddedController

    return EmbeddedController(config, namespace, device_pool)


def connect_daemon(address: str | None, namespace: KeyNamespace, device_pool: torch.Tensor,
                   **options) -> CacheClient:
    """A cache client attached to the daemon at ``address`` (None: the default ipc:// address).

    Options (see controller.client.DaemonClient): copy_backend, credentials
    (controller.client.Credentials: token / CURVE key files), request_timeout_s, client_name.
    """
    from controller.client import DaemonClient
    from controller.daemon.config import default_address

    return DaemonClient(address or default_address(), namespace, device_pool, **options)


__all__ = [
    "CacheClient", "CacheError", "ConfigError", "ControllerConfig", "L3Config",
    "LoadError", "LoadHandle", "LookupResult", "StoreResult", "connect", "connect_daemon",
]
