"""Small factories shared by the connector tests (named l3_* to stay unique on
sys.path: tests/connectors has no __init__.py)."""

from __future__ import annotations

import asyncio

import numpy as np


def run(coro):
    """Run one test scenario on a fresh event loop (a connector belongs to one loop)."""
    return asyncio.run(coro)


def keys_of(n: int, tag: bytes = b"") -> list[bytes]:
    """n distinct 16-byte page keys, different for different tags."""
    return [(tag[:8].ljust(8, b"_") + i.to_bytes(8, "little")) for i in range(n)]


def bf16_page(n_bytes: int, seed: int, channels: int = 128) -> bytes:
    """bf16 values shaped like KV: normals scaled per channel (the last dim)."""
    rng = np.random.default_rng(seed)
    n = n_bytes // 2
    scale = rng.uniform(0.05, 8.0, channels).astype(np.float32)
    x = rng.standard_normal(n, dtype=np.float32) * np.resize(scale, n)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
