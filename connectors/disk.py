"""A directory of page files with a byte capacity and LRU eviction.

Layout on disk (one file per page, 256 shard directories)::

    <path>/KVSTORE_DISK                                  marker: format version, owner
    <path>/<first 2 hex digits of key>/<key hex>          a complete frame
    <path>/<shard>/.<key hex>.<random>.tmp                being written

Ownership: the store keeps its files in a directory it owns. It takes a new or
empty directory and writes the marker there; it refuses a directory that holds
anything else without a marker (the user's files are never touched), a marker
of another format version, a directory it cannot write, and a directory that
another live connector holds (an exclusive ``flock`` on the marker, held until
close: each process counts only its own writes, so two owners would exceed the
capacity together). Engines that should share one disk tier attach to one
daemon (``kvstore serve``), which owns the directory. Even inside its own
directory it removes only files it could have written: temp files by their
exact name, page files whose name is a key and whose header starts with the
frame's magic.

A put writes a temp file and renames it over the final name, so a crash never
leaves a half page under a page's name (a temp file is deleted at the next
open). Without fsync (the default) a power loss may still leave a renamed file
with garbage: the frame checksum turns it into a miss, and the file is
removed when read (so is a file whose size is not the indexed one, before
it is read). A put that times out or is cancelled cannot stop its file job
(a worker thread): once that ends, the temp file and the page's file are
removed and the reserved capacity is given back. On open the index is
rebuilt from the directory, oldest modification time first (LRU order is
approximated by write time across restarts).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import secrets
from collections import OrderedDict

import aiofiles
import aiofiles.os

from connectors import codec as _codec
from connectors.base import Connector, ConnectorError, ReadInto, frame_status

log = logging.getLogger(__name__)

_MAX_DISK_KEY_LEN = 100  # hex file names must stay under NAME_MAX (255)
MARKER_NAME = "KVSTORE_DISK"
DISK_FORMAT_VERSION = 1
# read outcomes of files that were not read (see DiskConnector._open_sized)
_NOT_READ = frozenset({"gone", "resized", "unreadable"})
_TEMP_NAME = re.compile(r"\.([0-9a-f]{2,200})\.[0-9a-f]{8}\.tmp")


class DiskConnector(Connector):
    """Options: path (directory, created if missing), capacity_bytes (> 0; the
    sum of stored file sizes never exceeds it), fsync (fsync each page file
    before the rename; durable across power loss, slower). Reads run on the
    connector's `codec_threads` workers, at most that many jobs per sub-batch."""

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
        self._marker_fd = _claim_directory(self.path)
        try:
            self._rebuild_index()
        except BaseException:
            os.close(self._marker_fd)
            raise

    @property
    def used_bytes(self) -> int:
        """Bytes of complete files plus writes in flight (<= capacity_bytes)."""
        return self._used

    # ------------------------------------------------------------ raw methods
    async def _raw_get_many(self, keys):
        plan = self._plan_reads(keys)
        frames = [None] * len(keys)
        outcomes = await self._read_files(plan, lambda i, path, size: self._read_frame(path, size))
        for (i, path, size), outcome in zip(plan, outcomes):
            if not isinstance(outcome, str):
                frames[i] = outcome
            elif self._settle(keys[i], path, size, outcome) == "corrupt":
                self._stats.corrupt += 1     # the base class sees only a miss
                await self._drop(keys[i])
        return frames

    async def _raw_get_into_many(self, keys, views):
        plan = self._plan_reads(keys)
        outcomes = await self._read_files(
            plan, lambda i, path, size: self._read_into(path, size, keys[i], views[i]))
        statuses = ["absent"] * len(keys)
        num_bytes = 0
        for (i, path, size), outcome in zip(plan, outcomes):
            if outcome not in _NOT_READ:
                num_bytes += size
            statuses[i] = self._settle(keys[i], path, size, outcome)
        return ReadInto(statuses, num_bytes)

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
        at most timeout_s + 5 s: a hung file system must not hang close; then
        give up the directory (its lock)."""
        try:
            if self._finishing:
                await asyncio.wait(list(self._finishing.values()), timeout=self.timeout_s + 5.0)
        finally:
            if self._marker_fd is not None:
                os.close(self._marker_fd)   # closing the descriptor drops the flock
                self._marker_fd = None

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

    # Reads: the loop thread looks keys up in the index (and refreshes their
    # recency), then a few jobs on the connector's worker threads open, size-check
    # and read the files (one thread hop per job, not per file operation); the
    # outcomes come back to the loop thread, which alone changes the index.
    def _plan_reads(self, keys: list[bytes]) -> list[tuple[int, str, int]]:
        """(key index, file path, indexed size) of each indexed key."""
        plan = []
        for i, key in enumerate(keys):
            self._check_disk_key(key)
            size = self._index.get(key)
            if size is not None:
                self._index.move_to_end(key)
                plan.append((i, self._file(key), size))
        return plan

    async def _read_files(self, plan: list[tuple[int, str, int]], read) -> list:
        """read(i, path, size) for each plan entry, in order, split into at
        most codec_threads jobs on worker threads (waited for even if cancelled)."""
        if not plan:
            return []
        step = -(-len(plan) // min(self._codec_threads, len(plan)))

        def job(lo: int) -> list:
            return [read(i, path, size) for i, path, size in plan[lo:lo + step]]

        parts = await self._run_in_pool(*(lambda lo=lo: job(lo) for lo in range(0, len(plan), step)))
        return [outcome for part in parts for outcome in part]

    def _read_into(self, path: str, size: int, key: bytes, view: memoryview) -> str:
        """Read one page file into view and check it (on a worker thread): "hit",
        a `frame_status`, or why the file was not read (see `_open_sized`).

        A file of the view's length plus a header (a codec-none page) is read
        with one preadv: the header into a small buffer, the page straight into
        the view, where it is checked. Any other file (compressed) is read
        whole into scratch memory and decoded from there into the view.
        """
        fd = self._open_sized(path, size)
        if isinstance(fd, str):
            return fd
        try:
            if size == _codec.HEADER_LEN + len(view):
                head, payload = bytearray(_codec.HEADER_LEN), view
                num_read = os.preadv(fd, [head, view], 0)
            else:
                frame = memoryview(bytearray(size))
                head, payload = frame[:_codec.HEADER_LEN], frame[_codec.HEADER_LEN:]
                num_read = os.preadv(fd, [frame], 0)
        except OSError as exc:
            log.warning("disk store: cannot read %s: %s", path, exc)
            return "unreadable"
        finally:
            os.close(fd)
        if num_read != size:
            return "resized"
        try:   # a compressed frame that happens to have the page's length is decoded out of the view
            _codec.decode_parts_into(head, payload, view, self._fp, self._max_value, key, self._encoding)
        except Exception as exc:
            return frame_status(exc, type(self).__name__)
        return "hit"

    def _read_frame(self, path: str, size: int) -> bytearray | str:
        """The whole frame file at path (on a worker thread), or why it was not
        read (see `_open_sized`)."""
        fd = self._open_sized(path, size)
        if isinstance(fd, str):
            return fd
        try:
            frame = bytearray(size)
            return frame if os.preadv(fd, [frame], 0) == size else "resized"
        except OSError as exc:
            log.warning("disk store: cannot read %s: %s", path, exc)
            return "unreadable"
        finally:
            os.close(fd)

    def _open_sized(self, path: str, size: int) -> int | str:
        """A descriptor of the file at path if it has the indexed `size`, else why
        not: "gone" (no such file), "resized" (not `size` bytes: replaced, grown,
        truncated, or larger than any frame we accept; then nothing is read) or
        "unreadable" (I/O error). A file found shorter while it is read is
        "resized" too."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return "gone"
        except OSError as exc:
            log.warning("disk store: cannot open %s: %s", path, exc)
            return "unreadable"
        try:
            on_disk = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            log.warning("disk store: cannot stat %s: %s", path, exc)
            return "unreadable"
        if on_disk != size or on_disk > self._max_frame_bytes:
            os.close(fd)
            return "resized"
        return fd

    def _settle(self, key: bytes, path: str, size: int, outcome: str) -> str:
        """Apply a read's outcome to the index (on the loop thread); the status
        for the base class: "gone" and "unreadable" are misses, "resized" is
        corrupt unless the key was rewritten meanwhile (then a miss)."""
        if outcome == "gone":        # removed behind our back: forget it
            if self._index.get(key) == size:
                self._forget(key)
            return "absent"
        if outcome == "unreadable":
            return "absent"
        if outcome == "resized":
            if self._index.get(key) != size:
                return "absent"
            log.warning("disk store: %s is not the indexed %d bytes (limit %d): dropped",
                        path, size, self._max_frame_bytes)
            return "corrupt"
        return outcome

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
        """Index every complete page file; delete our own temp and broken files.
        Anything else (a file this store could not have written) is left alone."""
        found = []
        for shard in os.scandir(self.path):
            if not (shard.is_dir(follow_symlinks=False) and _is_shard_name(shard.name)):
                continue
            for entry in os.scandir(shard.path):
                kind = _classify(entry, shard.name)
                if kind == "page":
                    st = entry.stat()
                    found.append((st.st_mtime_ns, bytes.fromhex(entry.name), st.st_size))
                elif kind == "own-broken":
                    _unlink_quietly(entry.path)
                else:
                    log.warning("disk store: %s was not written by kvstore; left alone", entry.path)
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


def _is_shard_name(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _classify(entry: os.DirEntry, shard: str) -> str:
    """"page" (a complete page file of ours), "own-broken" (a temp file of ours,
    or a page file of ours that is truncated or of an old format) or "foreign"."""
    if not entry.is_file(follow_symlinks=False):
        return "foreign"
    temp = _TEMP_NAME.fullmatch(entry.name)
    if temp is not None:
        return "own-broken" if temp.group(1)[:2] == shard and len(temp.group(1)) % 2 == 0 else "foreign"
    name = entry.name
    # only the exact name that _file(key) builds is a key's file
    if not (2 <= len(name) <= 2 * _MAX_DISK_KEY_LEN and len(name) % 2 == 0 and name[:2] == shard
            and all(c in "0123456789abcdef" for c in name)):
        return "foreign"
    try:
        with open(entry.path, "rb") as f:
            head = f.read(_codec.HEADER_LEN)
    except OSError:
        return "foreign"
    if not head.startswith(_codec.MAGIC):
        return "foreign"
    try:
        _codec.parse_header(head, entry.stat().st_size)
    except ValueError:   # FrameError: ours, but truncated or of an older format
        return "own-broken"
    return "page"


def _claim_directory(path: str) -> int:
    """Make `path` this store's directory and lock it; returns the locked marker's fd.

    Raises ConnectorError, saying what to do, for a directory that holds other
    files, another format, cannot be written, or is held by another connector.
    """
    try:
        os.makedirs(path, exist_ok=True)
        entries = os.listdir(path)
    except OSError as exc:
        raise ConnectorError(f"cannot create disk store directory {path!r}: {exc}; "
                             "choose a path this user may create and write") from exc
    marker = os.path.join(path, MARKER_NAME)
    if MARKER_NAME not in entries and entries:
        raise ConnectorError(
            f"disk store directory {path!r} holds files kvstore did not write "
            f"({', '.join(sorted(entries)[:3])}...) and has no {MARKER_NAME} marker; "
            "give the disk tier a new or empty directory of its own")
    try:
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConnectorError(f"cannot write the disk store directory {path!r}: {exc}; "
                             "choose a directory on a writable file system") from exc
    try:
        _lock_and_check_marker(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_and_check_marker(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConnectorError(
            f"disk store directory {path!r} is in use by another kvstore process or connector "
            f"({_read_marker(fd).get('pid', 'unknown pid')}); give each its own directory, or run "
            "one daemon (kvstore serve) and attach the engines to it") from None
    except OSError as exc:
        raise ConnectorError(f"cannot lock the disk store directory {path!r}: {exc}") from exc
    info = _read_marker(fd)
    if info and info.get("format") != DISK_FORMAT_VERSION:
        raise ConnectorError(
            f"disk store directory {path!r} has format {info.get('format')!r}, this kvstore "
            f"writes format {DISK_FORMAT_VERSION}; give it a new directory")
    record = json.dumps({"format": DISK_FORMAT_VERSION, "owner": "kvstore", "pid": os.getpid()})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        os.fsync(fd)
    except OSError as exc:
        raise ConnectorError(f"cannot write the disk store directory {path!r}: {exc}; "
                             "choose a directory on a writable file system") from exc


def _read_marker(fd: int) -> dict:
    """The marker's record, {} if it is empty (new); a foreign marker raises."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return {}
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("owner") != "kvstore":
        raise ConnectorError(f"{MARKER_NAME} marker is not one kvstore wrote; give the disk "
                             "tier a new or empty directory of its own")
    return info


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
