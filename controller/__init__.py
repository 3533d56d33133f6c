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
    """A cache client attached to the daemon at ``address`` (None: ``KVSTORE_ADDRESS``, else
    the default ipc:// address, as ``kvstore serve`` and ``kvstore status`` choose it).

    The client must run on the daemon's node, as its user, sharing its /dev/shm: it maps
    the daemon's shared-memory segment. A malformed address raises ConfigError at once.
    Options (see controller.client.DaemonClient): copy_backend, credentials
    (controller.client.Credentials: token / CURVE key files), request_timeout_s,
    client_name, prefetch.
    """
    import os

    from controller.daemon.address import parse_address
    from controller.daemon.config import default_address

    address = address or os.environ.get("KVSTORE_ADDRESS") or default_address()
    parse_address(address)   # a malformed one fails before the client's imports
    from controller.client import DaemonClient

    return DaemonClient(address, namespace, device_pool, **options)


__all__ = [
    "CacheClient", "CacheError", "ConfigError", "ControllerConfig", "L3Config",
    "LoadError", "LoadHandle", "LookupResult", "StoreResult", "connect", "connect_daemon",
]
