"""L3 stores behind one async, batched interface (see base.Connector).

    conn = open_connector("disk", path="/var/cache/kv", capacity_bytes=64 << 30)
    await conn.put([key], [page]); pages = await conn.get([key])

Backends are imported only when opened: importing this package imports
neither redis, nor mooncake, nor aiofiles.
"""

from __future__ import annotations

import importlib
import inspect

from connectors.base import Connector, ConnectorError, ConnectorStats

__all__ = ["Connector", "ConnectorError", "ConnectorStats", "open_connector", "BACKENDS"]

# name -> (module, class); the module is imported on first open.
BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("connectors.memory", "MemoryConnector"),
    "disk": ("connectors.disk", "DiskConnector"),
    "redis": ("connectors.redis_store", "RedisConnector"),
    "redis_cluster": ("connectors.redis_store", "RedisClusterConnector"),
    "mooncake": ("connectors.mooncake_store", "MooncakeConnector"),
}


def open_connector(name: str, **options) -> Connector:
    """Open the backend `name` with its options (common ones: see Connector).

    Raises ConnectorError for an unknown name or option, a bad option value,
    or a backend whose client package is not installed.
    """
    if name not in BACKENDS:
        raise ConnectorError(f"unknown connector {name!r}; use one of {sorted(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ConnectorError(
            f"connector {name!r} needs a package that is not installed ({exc}); "
            f"install it (mooncake: pip install 'kvstore[mooncake]')") from exc
    allowed = _option_names(cls)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConnectorError(
            f"connector {name!r} has no option(s) {unknown}; valid options: {sorted(allowed)}")
    try:
        return cls(**options)
    except ConnectorError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConnectorError(f"bad options for connector {name!r}: {exc}") from exc


def _option_names(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return names
