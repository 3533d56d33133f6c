"""The disk store's hold on its directory: one owner at a time, even when the directory's
contents, or the directory itself, are removed while the owner runs.

The owner holds two exclusive ``flock`` locks, taken in this order:

    DIR               (an O_DIRECTORY descriptor)  survives ``rm -rf DIR/*``: a second
                                                   store is refused while the owner lives
    DIR/KVSTORE_DISK  (the marker)                 says what the directory is (format, owner,
                                                   pid); also refuses older kvstore versions,
                                                   which lock only the marker

Nothing is created in a directory before its lock is held, so a refused store leaves
no trace. What the owner cannot prevent, it notices: ``check()`` (two stats, run
before each batch of file I/O) tells an intact home from one whose marker is gone
(``rm -rf DIR/*``: the directory is still ours, locked; the marker is written anew)
and one whose directory was removed or replaced (``rm -rf DIR``: the store makes a
new one and claims it, unless another store got there first; then the disk tier is
lost until restart). Page files are never written into a directory that is not
held: shards are created with ``mkdir`` inside the held directory, never with
``makedirs`` (which would re-create a removed DIR without its marker).
"""

from __future__ import annotations

import fcntl
import json
import os

from connectors.base import ConnectorError

MARKER_NAME = "KVSTORE_DISK"
DISK_FORMAT_VERSION = 1

INTACT, EMPTIED, REMOVED = "intact", "emptied", "removed"


class DiskHome:
    """A claimed, locked disk store directory. Not thread-safe (the loop thread uses it)."""

    def __init__(self, path: str) -> None:
        """Claim ``path`` (created if missing); raises ConnectorError saying what to do
        for a directory that holds other files, another format, cannot be written, or is
        held by another store."""
        self.path = path
        self._dir_fd: int | None = None
        self._marker_fd: int | None = None
        self._claim()

    # ---- claim -----------------------------------------------------------------------------
    def _claim(self) -> None:
        path = self.path
        try:
            os.makedirs(path, exist_ok=True)
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConnectorError(f"cannot create disk store directory {path!r}: {exc}; "
                                 "choose a path this user may create and write") from exc
        try:
            _lock(dir_fd, path, lambda: _marker_pid(path))
            entries = os.listdir(dir_fd)
            if MARKER_NAME not in entries and entries:
                raise ConnectorError(
                    f"disk store directory {path!r} holds files kvstore did not write "
                    f"({', '.join(sorted(entries)[:3])}...) and has no {MARKER_NAME} marker; "
                    "give the disk tier a new or empty directory of its own")
            marker_fd = _open_marker(dir_fd, path)
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd, self._marker_fd = dir_fd, marker_fd
        self._identity = _identity(os.fstat(dir_fd)), _identity(os.fstat(marker_fd))

    # ---- what happened to it ----------------------------------------------------------------
    def check(self) -> str:
        """INTACT, EMPTIED (the directory is ours, its marker is gone) or REMOVED (the
        path no longer names the directory we hold)."""
        dir_id, marker_id = self._identity
        try:
            if _identity(os.stat(self.path)) != dir_id:
                return REMOVED
        except OSError:
            return REMOVED
        try:
            if _identity(os.stat(os.path.join(self.path, MARKER_NAME))) != marker_id:
                return EMPTIED
        except OSError:
            return EMPTIED
        return INTACT

    def reclaim(self, what: str) -> None:
        """Make the home whole after ``check()`` said ``what``: write the marker anew into
        our (still locked) directory, or claim the path afresh. Raises ConnectorError when
        that fails (another store owns the path now)."""
        if what == EMPTIED:
            os.close(self._marker_fd)
            self._marker_fd = None
            self._marker_fd = _open_marker(self._dir_fd, self.path)
            self._identity = self._identity[0], _identity(os.fstat(self._marker_fd))
        elif what == REMOVED:
            self.close()
            self._claim()

    def shard_dir(self, name: str) -> str:
        """``DIR/name``, created (inside the held directory only) if missing."""
        shard = os.path.join(self.path, name)
        try:
            os.mkdir(shard)
        except FileExistsError:
            pass
        return shard

    def close(self) -> None:
        """Give up the directory (closing the descriptors drops the locks). Idempotent."""
        for fd in (self._marker_fd, self._dir_fd):
            if fd is not None:
                os.close(fd)
        self._marker_fd = self._dir_fd = None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lock(fd: int, path: str, owner) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConnectorError(
            f"disk store directory {path!r} is in use by another kvstore process or connector "
            f"({owner()}); give each its own directory, or run one daemon (kvstore serve) and "
            "attach the engines to it") from None
    except OSError as exc:
        raise ConnectorError(f"cannot lock the disk store directory {path!r}: {exc}") from exc


def _open_marker(dir_fd: int, path: str) -> int:
    """Open (create) the marker in the held directory, lock it, check and rewrite it."""
    try:
        fd = os.open(MARKER_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        raise ConnectorError(f"cannot write the disk store directory {path!r}: {exc}; "
                             "choose a directory on a writable file system") from exc
    try:
        _lock(fd, path, lambda: _read_marker(fd).get("pid", "unknown pid"))
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
    except BaseException:
        os.close(fd)
        raise
    return fd


def _marker_pid(path: str) -> str:
    """The pid the marker names, for an error message (never raises)."""
    try:
        with open(os.path.join(path, MARKER_NAME), "rb") as f:
            return f"pid {json.loads(f.read(4096)).get('pid', 'unknown')}"
    except (OSError, ValueError, AttributeError):
        return "unknown pid"


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
