"""A tenant's view of the shared L3 store: its keys salted, its bytes bounded.

Tenants share one L3 store (a disk directory, Redis, Mooncake), so page keys alone
would let one tenant read another's pages by sending their keys (clients send keys,
not tokens). Every key a tenant's pool sends to L3 is replaced by a keyed hash of it
under the tenant's salt (``pools.tenant_salt``): a tenant cannot produce a key that
lands on another tenant's page without a preimage of that hash.

The L3 quota (``l3_bytes``) counts the page bytes this daemon wrote to L3 for the
tenant and has not seen go (a read that misses a page it wrote: the store evicted
it). A put that would pass the quota is refused for those pages (counted in
``l3_refused_pages``; they stay in L2 until evicted, then are dropped, as for a
full store). What another daemon wrote for the same tenant is not counted.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class TenantL3Usage:
    """What one tenant holds in L3 as far as this daemon knows (shared by its pools, whose
    L3 threads differ: hence the lock)."""

    sizes: dict[bytes, int] = field(default_factory=dict)
    num_bytes: int = 0
    num_refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: bytes, size: int) -> None:
        with self.lock:
            self.num_bytes += size - self.sizes.get(key, 0)
            self.sizes[key] = size

    def forget(self, key: bytes) -> None:
        with self.lock:
            self.num_bytes -= self.sizes.pop(key, 0)

    def take_room(self, sizes: list[int], quota: int) -> int:
        """How many of ``sizes`` (in order) fit under ``quota``; the rest count as refused."""
        with self.lock:
            room, allowed = quota - self.num_bytes, 0
            for size in sizes:
                if size > room:
                    break
                room -= size
                allowed += 1
            self.num_refused += len(sizes) - allowed
            return allowed


class TenantL3:
    """Wraps a connector (``connectors.base.Connector``): salted keys, a byte quota.
    Everything else (stats, health, close) is the connector's."""

    def __init__(self, inner: Any, salt: bytes, usage: TenantL3Usage, quota_bytes: int | None) -> None:
        self._inner = inner
        self._salt = salt
        self._usage = usage
        self._quota = quota_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _salted(self, keys: Sequence[bytes]) -> list[bytes]:
        salt = self._salt
        return [hashlib.blake2b(k, digest_size=16, key=salt).digest() for k in keys]

    async def exists(self, keys: Sequence[bytes]) -> int:
        return await self._inner.exists(self._salted(keys))

    async def get_into(self, keys: Sequence[bytes], buffers: Sequence[memoryview]) -> list[bool]:
        salted = self._salted(keys)
        found = await self._inner.get_into(salted, buffers)
        for key, ok in zip(salted, found):
            if not ok:
                self._usage.forget(key)   # gone from the store (or unreadable): not held
        return found

    async def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return await self._inner.get(self._salted(keys))

    async def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> list[bool]:
        salted = self._salted(keys)
        sizes = [memoryview(v).nbytes for v in values]
        allowed = len(keys) if self._quota is None else self._usage.take_room(sizes, self._quota)
        stored = await self._inner.put(salted[:allowed], values[:allowed]) if allowed else []
        for key, size, ok in zip(salted, sizes, stored):
            if ok:
                self._usage.add(key, size)
        return list(stored) + [False] * (len(keys) - allowed)

    async def delete(self, keys: Sequence[bytes]) -> int:
        salted = self._salted(keys)
        for key in salted:
            self._usage.forget(key)
        return await self._inner.delete(salted)
