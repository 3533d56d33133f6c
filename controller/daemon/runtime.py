"""Where a daemon lives on the host: its socket, its lock file, and what a dead one left behind.

One lock file per address, held (flock) for the daemon's whole life::

    ipc://DIR/kvstore.sock   ->  DIR/kvstore.sock.lock
    tcp://HOST:PORT          ->  <runtime dir>/tcp-HOST-PORT.lock

A second daemon on the same address finds the lock held and is refused. When
the lock is free but the file exists, its last holder died: the lock file
names the segment it had, and that segment and the old socket are removed.
Directories made here are 0700, sockets 0600 (ipc:// trusts the file system).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from pathlib import Path

from controller.daemon.config import runtime_dir

log = logging.getLogger(__name__)


class AddressInUse(RuntimeError):
    """Another live daemon serves this address."""


def ipc_path(address: str) -> Path | None:
    return Path(address[len("ipc://"):]) if address.startswith("ipc://") else None


def _lock_path(address: str) -> Path:
    path = ipc_path(address)
    if path is not None:
        return path.with_name(path.name + ".lock")
    return runtime_dir() / (re.sub(r"[^A-Za-z0-9.]+", "-", address[len("tcp://"):]) + ".lock")


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; refuse an existing one others can write into."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(
            f"{path} is not a private directory of this user (mode {oct(st.st_mode & 0o777)}); "
            "choose another --address or fix its owner and mode (chmod 700)")


class InstanceLock:
    """The held lock of one address; ``record`` writes who holds it, ``release`` cleans up."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.path = _lock_path(address)
        make_private_dir(self.path.parent)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read().get("pid", "?")
            os.close(self._fd)
            self._fd = None
            raise AddressInUse(
                f"a kvstore daemon (pid {holder}) is already serving {address}; stop it first "
                f"(kill -TERM {holder}) or start this one with another --address") from None
        self._remove_leftovers(self._read())

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remove_leftovers(self, previous: dict) -> None:
        segment = previous.get("segment")
        if isinstance(segment, str) and re.fullmatch(r"[A-Za-z0-9._-]+", segment):
            shm = Path("/dev/shm") / segment
            if shm.exists():
                log.warning("removing shm segment %s of a dead daemon (pid %s)", segment,
                            previous.get("pid"))
                shm.unlink(missing_ok=True)
        sock = ipc_path(self.address)
        if sock is not None and sock.exists():
            log.warning("removing stale socket %s of a dead daemon", sock)
            sock.unlink()

    def record(self, pid: int, segment: str) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": pid, "segment": segment}).encode(), 0)

    def release(self) -> None:
        """Remove the socket and the lock file, then let go of the lock. Idempotent."""
        if self._fd is None:
            return
        sock = ipc_path(self.address)
        if sock is not None:
            sock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
