"""An in-process L3 backend: framed values in a dict, for tests of other packages.

It runs the same framing, checksum and codec path as the real stores, so a
test that passes against it exercises everything but the network.
"""

from __future__ import annotations

from collections import OrderedDict

from connectors.base import Connector, ConnectorError

# shared_name -> store, so several connectors in one process can share an L3
# (e.g. two embedded controllers). Lives as long as the process.
_SHARED: dict[str, "_MemoryStore"] = {}


class _MemoryStore:
    """Framed values in LRU order with a byte capacity (0 = unbounded)."""

    __slots__ = ("data", "used_bytes", "capacity_bytes")

    def __init__(self, capacity_bytes: int) -> None:
        self.data: OrderedDict[bytes, bytes] = OrderedDict()
        self.used_bytes = 0
        self.capacity_bytes = capacity_bytes

    def put(self, key: bytes, frame: bytes) -> bool:
        """Store a copy-owned frame, evicting least recently used ones."""
        if self.capacity_bytes and len(frame) > self.capacity_bytes:
            return False
        self.pop(key)
        while self.capacity_bytes and self.used_bytes + len(frame) > self.capacity_bytes:
            self.pop(next(iter(self.data)))
        self.data[key] = frame
        self.used_bytes += len(frame)
        return True

    def pop(self, key: bytes) -> bool:
        frame = self.data.pop(key, None)
        if frame is None:
            return False
        self.used_bytes -= len(frame)
        return True


class MemoryConnector(Connector):
    """Options: capacity_bytes (0 = unbounded; LRU eviction past it),
    shared_name (connectors opened with the same name share one store)."""

    default_codec = "none"

    def __init__(self, *, capacity_bytes: int = 0, shared_name: str = "", **common) -> None:
        super().__init__(**common)
        if capacity_bytes < 0:
            raise ConnectorError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if shared_name:
            self._store = _SHARED.setdefault(shared_name, _MemoryStore(capacity_bytes))
        else:
            self._store = _MemoryStore(capacity_bytes)

    async def _raw_get_many(self, keys):
        data = self._store.data
        out = []
        for k in keys:
            frame = data.get(k)
            if frame is not None:
                data.move_to_end(k)
            out.append(frame)
        return out

    async def _raw_put_many(self, keys, frames):
        return [self._store.put(k, f.tobytes()) for k, f in zip(keys, frames)]

    async def _raw_exists_many(self, keys):
        return [k in self._store.data for k in keys]

    async def _raw_delete_many(self, keys):
        return sum(self._store.pop(k) for k in keys)

    async def _on_corrupt(self, keys):
        for k in keys:
            self._store.pop(k)
