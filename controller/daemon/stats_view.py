"""What GetStats and the metrics show of several pools: summed counters, per pool and
per tenant entries (as JSON text: the stats map carries flat scalars only)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from controller.api import CacheStats

_MAX_JSON = 4000
"""A stats string must stay under the protocol's string bound (4 KiB)."""


def core_stats_of(cores: list) -> dict[str, int | float]:
    """The numeric CacheStats fields of ``cores``, summed (rates: the largest)."""
    if not cores:   # no pool yet: the fields all at zero
        return {k: v for k, v in dataclasses.asdict(CacheStats()).items() if type(v) in (int, float)}
    out: dict[str, int | float] = {}
    for core in cores:
        for name, value in dataclasses.asdict(core.stats()).items():
            if type(value) is int:
                out[name] = out.get(name, 0) + value
            elif type(value) is float:
                out[name] = max(out.get(name, 0.0), value)
    return out


def pools_entries(described: list[dict[str, Any]], visible: list, tenants: dict) -> dict[str, str]:
    """``pools`` and ``tenants`` as JSON text, entries dropped from the end until each fits."""
    keys = {(pool.tenant, pool.fingerprint) for pool in visible}
    pools = [d for d in described if (d["tenant"], d["layout"]) in keys]
    return {"pools": _fit(pools), "tenants": _fit([{"tenant": k, **v} for k, v in tenants.items()])}


def _fit(entries: list) -> str:
    while True:
        text = json.dumps(entries, separators=(",", ":"))
        if len(text) <= _MAX_JSON or not entries:
            return text
        entries = entries[:-1]
