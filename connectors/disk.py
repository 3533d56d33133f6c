"""A directory of page files with a byte capacity and LRU eviction.

Layout on disk (one file per page, 256 shard directories)::

    <path>/<first 2 hex digits of key>/<key hex>          a complete frame
    <path>/<shard>/.<key hex>.<random>.tmp                being written

A put writes a temp file and renames it over the final name, so a crash never
leaves a half page under a page's name (a temp file is deleted at the next
open). Without fsync (the default) a power loss may still leave a renamed file
with garbage: the frame checksum turns it into a miss, and the file is
removed when read. On open the index is rebuilt from the directory, oldest
modification time first (LRU order is approximated by write time across
restarts); files whose size does not match their header are removed.

The connector owns the directory: two live connectors on one path are not
supported (each would keep its own index and capacity).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import OrderedDict

import aiofiles
import aiofiles.os

from connectors import codec as _codec
from connectors.base import Connector, ConnectorError

log = logging.getLogger(__name__)

_MAX_DISK_KEY_LEN = 100  # hex file names must stay under NAME_MAX (255)


class DiskConnector(Connector):
    """Options: path (directory, created if missing), capacity_bytes (> 0; the
    sum of stored file sizes never exceeds it), fsync (fsync each page file
    before the rename; durable across power loss, slower)."""

    default_codec = "none"
    # 16 pages of 8 MiB per sub-batch; a local disk is slow only when it is
    # busy, so a timeout here means a hung file system, not a slow page.
    default_max_batch_keys = 16
    default_timeout_s = 30.0

    def __init__(self, *, path: str, capacity_bytes: int, fsync: bool = False, **common) -> None:
        super().__init__(**common)
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConnectorError("disk connector needs path=<directory>")
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConnectorError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.path = os.fspath(path)
        self.capacity_bytes = capacity_bytes
        self._fsync = fsync
        # key -> file size, least recently used first. Holds only complete files.
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._used = 0          # bytes in the index + bytes reserved by writes in flight
        self._locks: dict[bytes, asyncio.Lock] = {}
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ConnectorError(f"cannot create disk store directory {self.path!r}: {exc}") from exc
        self._rebuild_index()

    @property
    def used_bytes(self) -> int:
        """Bytes of complete files plus writes in flight (<= capacity_bytes)."""
        return self._used

    # ------------------------------------------------------------ raw methods
    async def _raw_get_many(self, keys):
        return await asyncio.gather(*(self._read(k) for k in keys))

    async def _raw_put_many(self, keys, frames):
        return await asyncio.gather(*(self._write(k, f) for k, f in zip(keys, frames)))

    async def _raw_exists_many(self, keys):
        return [k in self._index for k in keys]

    async def _raw_delete_many(self, keys):
        num = 0
        for k in keys:
            self._check_disk_key(k)
            if k in self._index:
                await self._drop(k)
                num += 1
        return num

    async def _on_corrupt(self, keys):
        for k in keys:
            if k in self._index:
                await self._drop(k)

    # ------------------------------------------------------------ files
    def _file(self, key: bytes) -> str:
        name = key.hex()
        return os.path.join(self.path, name[:2], name)

    def _check_disk_key(self, key: bytes) -> None:
        if len(key) > _MAX_DISK_KEY_LEN:
            raise ConnectorError(f"disk keys must be at most {_MAX_DISK_KEY_LEN} bytes")

    async def _read(self, key: bytes):
        self._check_disk_key(key)
        if key not in self._index:
            return None
        self._index.move_to_end(key)
        try:
            async with aiofiles.open(self._file(key), "rb") as f:
                return await f.read()
        except FileNotFoundError:   # removed behind our back: forget it
            self._forget(key)
        except OSError as exc:
            log.warning("disk store: cannot read %s: %s", self._file(key), exc)
        return None

    async def _write(self, key: bytes, frame) -> bool:
        self._check_disk_key(key)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:   # one writer per key at a time: the index stays exact
                return await self._write_locked(key, frame)
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def _write_locked(self, key: bytes, frame) -> bool:
        had_old = key in self._index
        self._forget(key)    # the rename below replaces the old file atomically
        if not await self._reserve(len(frame)):
            if had_old:
                await _remove_quietly(self._file(key))
            return False
        final = self._file(key)
        tmp = os.path.join(os.path.dirname(final),
                           f".{os.path.basename(final)}.{secrets.token_hex(4)}.tmp")
        try:
            await aiofiles.os.makedirs(os.path.dirname(final), exist_ok=True)
            async with aiofiles.open(tmp, "wb") as f:
                await f.write(frame.head)
                await f.write(frame.payload)
                if self._fsync:
                    await f.flush()
                    await asyncio.to_thread(os.fsync, f.fileno())
            await aiofiles.os.replace(tmp, final)
        except OSError as exc:   # disk full, I/O error, permissions: this page is not stored
            self._used -= len(frame)
            log.warning("disk store: cannot write %s: %s", final, exc)
            await _remove_quietly(tmp)
            if had_old:
                await _remove_quietly(final)
            return False
        self._index[key] = len(frame)
        return True

    async def _reserve(self, size: int) -> bool:
        """Make room for `size` bytes by evicting least recently used files."""
        if size > self.capacity_bytes:
            return False
        while self._used + size > self.capacity_bytes:
            if not self._index:
                return False    # the rest is reserved by writes in flight
            await self._drop(next(iter(self._index)))
        self._used += size
        return True

    async def _drop(self, key: bytes) -> None:
        path = self._file(key)
        self._forget(key)
        await _remove_quietly(path)

    def _forget(self, key: bytes) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    # ------------------------------------------------------------ restart
    def _rebuild_index(self) -> None:
        """Index every complete page file; delete temp and malformed files."""
        found = []
        for shard in os.scandir(self.path):
            if not (shard.is_dir() and len(shard.name) == 2):
                continue
            for entry in os.scandir(shard.path):
                key = self._valid_file(entry)
                if key is None:
                    _unlink_quietly(entry.path)
                else:
                    st = entry.stat()
                    found.append((st.st_mtime_ns, key, st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        while self._used > self.capacity_bytes:   # capacity shrank since last run
            key, size = self._index.popitem(last=False)
            self._used -= size
            _unlink_quietly(self._file(key))
        if found:
            log.info("disk store %s: %d pages, %d bytes reloaded", self.path, len(self._index), self._used)

    @staticmethod
    def _valid_file(entry: os.DirEntry) -> bytes | None:
        """The key of a complete-looking page file, or None (temp, foreign, truncated)."""
        if not entry.is_file() or entry.name.startswith("."):
            return None
        try:
            key = bytes.fromhex(entry.name)
            with open(entry.path, "rb") as f:
                _codec.parse_header(f.read(_codec.HEADER_LEN), entry.stat().st_size)
        except (ValueError, OSError):   # FrameError is a ValueError
            return None
        if not key or entry.name[:2] != os.path.basename(os.path.dirname(entry.path)):
            return None
        return key


async def _remove_quietly(path: str) -> None:
    """Remove a file that may already be gone; other errors are logged."""
    try:
        await aiofiles.os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("disk store: cannot remove %s: %s", path, exc)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("disk store: cannot remove %s: %s", path, exc)
