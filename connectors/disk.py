"""A directory of page files with a byte capacity and LRU eviction.

Layout on disk (one file per page, 256 shard directories)::

    <path>/<first 2 hex digits of key>/<key hex>          a complete frame
    <path>/<shard>/.<key hex>.<random>.tmp                being written

A put writes a temp file and renames it over the final name, so a crash never
leaves a half page under a page's name (a temp file is deleted at the next
open). Without fsync (the default) a power loss may still leave a renamed file
with garbage: the frame checksum turns it into a miss, and the file is
removed when read (so is a file whose size is not the indexed one, before
it is read). A put that times out or is cancelled cannot stop its file job
(a worker thread): once that ends, the temp file and the page's file are
removed and the reserved capacity is given back. On open the index is
rebuilt from the directory, oldest modification time first (LRU order is
approximated by write time across restarts); files whose size does not match
their header, or whose name is not exactly the lower-case hex of a key, are
removed.

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
        # key -> task undoing a cancelled write of it once its file job ends
        self._finishing: dict[bytes, asyncio.Task] = {}
        # largest frame file accepted: max_value_bytes of page, its header,
        # and the worst-case growth of the lz4/zstd codecs on random data
        self._max_frame_bytes = _codec.HEADER_LEN + self._max_value + (self._max_value >> 7) + 4096
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

    async def _close(self):
        """Wait for abandoned (timed-out, cancelled) writes to be undone, for
        at most timeout_s + 5 s: a hung file system must not hang close."""
        if self._finishing:
            await asyncio.wait(list(self._finishing.values()), timeout=self.timeout_s + 5.0)

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
        size = self._index.get(key)
        if size is None:
            return None
        self._index.move_to_end(key)
        path = self._file(key)
        try:
            async with aiofiles.open(path, "rb") as f:
                # Size first: a file that is not the frame we indexed (replaced,
                # grown, or larger than any value we accept) is never read whole.
                on_disk = os.fstat(f.fileno()).st_size
                if on_disk != size or on_disk > self._max_frame_bytes:
                    if self._index.get(key) != size:   # rewritten meanwhile: not corrupt
                        return None
                    log.warning("disk store: %s is %d bytes, indexed %d (limit %d): dropped",
                                path, on_disk, size, self._max_frame_bytes)
                    self._stats.corrupt += 1
                    await self._drop(key)
                    return None
                return await f.read(size)
        except FileNotFoundError:   # removed behind our back: forget it
            self._forget(key)
        except OSError as exc:
            log.warning("disk store: cannot read %s: %s", path, exc)
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
        finishing = self._finishing.get(key)
        if finishing is not None:   # a cancelled write of this key is still on disk
            await asyncio.shield(finishing)
        had_old = key in self._index
        self._forget(key)    # the rename below replaces the old file atomically
        final = self._file(key)
        size = len(frame)
        try:
            reserved = await self._reserve(size)
        except BaseException:   # cancelled while evicting: nothing reserved yet
            if had_old:
                _unlink_quietly(final)
            raise
        if not reserved:
            if had_old:
                await _remove_quietly(final)
            return False
        tmp = os.path.join(os.path.dirname(final),
                           f".{os.path.basename(final)}.{secrets.token_hex(4)}.tmp")
        # The file I/O is one job on a worker thread. A thread cannot be
        # stopped, so a timed-out or cancelled put leaves it running: the
        # reservation is given back and the files removed only once it is done
        # (see _finish_later), and the next put of this key waits for that.
        job = asyncio.get_running_loop().run_in_executor(
            None, self._write_file, tmp, final, frame)
        try:
            await asyncio.shield(job)
        except OSError as exc:   # disk full, I/O error, permissions: this page is not stored
            self._used -= size
            log.warning("disk store: cannot write %s: %s", final, exc)
            _unlink_quietly(tmp)
            if had_old:
                _unlink_quietly(final)
            return False
        except BaseException:    # cancelled (timeout) or worse: undo once the job is over
            self._finish_later(key, job, tmp, final, size)
            raise
        self._index[key] = size
        return True

    def _write_file(self, tmp: str, final: str, frame) -> None:
        """Write a frame to tmp and rename it over final (on a worker thread)."""
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(frame.head)
            f.write(frame.payload)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)

    def _finish_later(self, key: bytes, job: asyncio.Future, tmp: str, final: str, size: int) -> None:
        """After an abandoned write's job ends: give back its reservation and
        remove its temp file and whatever it (or an old value) left at final;
        the key is not indexed, so nothing there is reachable."""
        async def finish() -> None:
            try:
                await asyncio.wait([job])
            finally:
                if job.done() and not job.cancelled():
                    job.exception()     # retrieved: a failed abandoned write is expected
                self._used -= size
                _unlink_quietly(tmp)
                _unlink_quietly(final)
                if self._finishing.get(key) is task:
                    del self._finishing[key]

        task = asyncio.get_running_loop().create_task(finish())
        self._finishing[key] = task

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
        except ValueError:
            return None
        # fromhex also takes upper case and spaces: only the exact name that
        # _file(key) builds is the key's file, anything else is never reached
        if not key or len(key) > _MAX_DISK_KEY_LEN or entry.name != key.hex():
            return None
        if entry.name[:2] != os.path.basename(os.path.dirname(entry.path)):
            return None
        try:
            with open(entry.path, "rb") as f:
                _codec.parse_header(f.read(_codec.HEADER_LEN), entry.stat().st_size)
        except (ValueError, OSError):   # FrameError is a ValueError
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
