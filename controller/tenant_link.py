"""The client's half of the daemon's side socket (controller/daemon/fd_broker.py): a
ticket for its uid before Hello, its tenant's segment as a file descriptor after.

A daemon that serves tenants keeps each tenant's pages in a memfd of its own that has
no name anywhere: the only way in is the descriptor the daemon hands to that tenant's
clients over a unix socket (SCM_RIGHTS), after checking who they are.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from pathlib import Path

from controller.api import CacheError

_TIMEOUT_S = 5.0
_MAX_REPLY = 512


def ticket_path(address: str) -> Path | None:
    """The side socket of an ipc daemon, if it has one (a legacy daemon has none)."""
    if not address.startswith("ipc://"):
        return None
    path = Path(address[len("ipc://"):] + ".fd")
    return path if path.exists() else None


def fetch_ticket(address: str, timeout_s: float = _TIMEOUT_S) -> bytes:
    """A one-time ticket naming this process's uid to the daemon (b"" where the daemon
    has no side socket: tcp, or a daemon that serves one user in /dev/shm)."""
    path = ticket_path(address)
    if path is None:
        return b""
    try:
        reply, _ = _ask(path, b"T", timeout_s)
    except _NoListener:   # a dead daemon's socket file: whoever serves now has none
        return b""
    if len(reply) != 16:
        raise CacheError(f"the daemon's side socket {path} sent a bad ticket")
    return reply


def receive_segment(path: str, secret: bytes, min_bytes: int,
                    timeout_s: float = _TIMEOUT_S) -> mmap.mmap:
    """Redeem ``secret`` (from HelloReply) for the segment's descriptor and map it
    read-write; the descriptor is closed once mapped (the mapping keeps the memory)."""
    if not path.startswith("/") or len(path) > 107:
        raise CacheError(f"the daemon named side socket {path!r}, which is not an absolute "
                         "unix socket path; is that a kvstore daemon?")
    reply, fds = _ask(Path(path), b"F" + secret, timeout_s)
    try:
        if len(fds) != 1 or len(reply) != 8:
            raise CacheError(f"the daemon's side socket {path} did not hand over one segment")
        size = struct.unpack("<Q", reply)[0]
        actual = os.fstat(fds[0]).st_size
        if size < min_bytes or actual < size:
            raise CacheError(f"the segment handed over holds {actual} bytes, fewer than the "
                             f"{min_bytes} its Hello announced")
        return mmap.mmap(fds[0], size)
    finally:
        for fd in fds:
            os.close(fd)


class _NoListener(CacheError):
    """The side socket's file exists but nothing listens (its daemon died)."""


def _ask(path: Path, request: bytes, timeout_s: float) -> tuple[bytes, list[int]]:
    """One request on the side socket: (payload after b"K", file descriptors)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    fds: list[int] = []
    try:
        try:
            sock.connect(str(path))
            sock.sendall(request)
            data, fds, _, _ = socket.recv_fds(sock, _MAX_REPLY, 4)
            while data[:1] == b"K" and request[:1] == b"T" and len(data) < 17:
                more = sock.recv(17 - len(data))
                if not more:
                    break
                data += more
        except (ConnectionRefusedError, FileNotFoundError):
            raise _NoListener(f"nothing listens on {path}") from None
        except PermissionError:
            raise CacheError(f"no permission to connect to the daemon's side socket {path} (uid "
                             f"{os.getuid()}): the daemon admits other users only with "
                             "--allow-users") from None
        except OSError as exc:
            raise CacheError(f"the daemon's side socket {path} failed: {exc}") from None
    finally:
        sock.close()
    if data[:1] == b"K":
        return data[1:], fds
    for fd in fds:
        os.close(fd)
    reason = data[1:].decode(errors="replace") if data[:1] == b"E" else "no answer"
    raise CacheError(f"the daemon refused this client on {path}: {reason}")


class PinnedPrefix:
    """Pins (cudaHostRegister, portable + mapped) a growing prefix of a sparse segment.

    Pinning makes every page resident, so pinning a tenant segment (sized for the whole
    budget, mostly never touched) at once would take all that memory. The daemon hands
    out low slots first, so the slots in use sit near the start: the prefix up to the
    highest slot a copy names is pinned before the copy (``cover``), growing by doubling
    (in 2 MiB steps at least). Pages pinned stay resident until the client unmaps, even
    when the daemon frees their slots: a client holds at most its pool's peak."""

    _STEP = 2 << 20

    def __init__(self, base_ptr: int, size: int, slot_bytes: int) -> None:
        self._base, self._size, self._slot_bytes = base_ptr, size, slot_bytes
        self._ranges: list[int] = []   # start pointers of the registered ranges
        self.num_bytes = 0

    def cover(self, max_slot: int) -> bool:
        """Pin up to the end of slot ``max_slot``; False if CUDA refused (copies would fault)."""
        import torch

        end = (max_slot + 1) * self._slot_bytes
        if end <= self.num_bytes:
            return True
        end = max(end, 2 * self.num_bytes)
        end = min(self._size, -(-end // self._STEP) * self._STEP)
        ptr = self._base + self.num_bytes
        err = torch.cuda.cudart().cudaHostRegister(ptr, end - self.num_bytes, 0x01 | 0x02)
        if int(err) != 0:
            return False
        self._ranges.append(ptr)
        self.num_bytes = end
        return True

    def close(self) -> None:
        import torch

        for ptr in self._ranges:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._ranges.clear()
        self.num_bytes = 0
