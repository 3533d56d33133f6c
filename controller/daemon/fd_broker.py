"""The daemon's side socket: who a local client is (SO_PEERCRED), and its tenant's segment
handed over as a file descriptor (SCM_RIGHTS).

ZMQ sockets can neither tell the daemon the peer's uid nor carry file descriptors, so
a plain unix stream socket sits next to the ipc socket (``<socket>.fd``; for tcp in
the runtime directory). One request per connection, answered at once::

    client -> b"T"                 daemon -> b"K" + ticket (16 bytes)
    client -> b"F" + secret (16)   daemon -> b"K" + size (u64 LE), the memfd attached
    on refusal                     daemon -> b"E" + a reason (utf-8)

- A **ticket** binds the kernel-verified uid of the connecting process to the Hello
  that carries it (one use, ``TTL_S``): the daemon names the tenant ``uid:<uid>`` from
  it, never from anything the client says about itself.
- A **secret** comes in the HelloReply of one session; redeemed once (``TTL_S``), by a
  process of the uid that session was opened for, it yields that session's segment.
  Tenants with a token (tcp, or ipc with a token) are bound by the secret alone.
- Only uids in ``allowed_uids`` (the daemon's own, plus ``--allow-users``) get an
  answer at all.

A thread of its own accepts; each request is served on a short-lived thread (at most
64 at once, 8 per uid), read whole within 0.5 s, so a peer that trickles bytes holds only
itself. The state shared with the daemon's loop (tickets, grants) sits under a lock.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kvstore.daemon")

TTL_S = 30.0
_MAX_PENDING = 4096
_MAX_PENDING_PER_SEGMENT = 64
_IO_TIMEOUT_S = 1.0
_REQUEST_DEADLINE_S = 0.5
"""A whole request (17 bytes at most) must arrive within this: a peer trickling bytes
holds only its own connection's thread, and only this long."""
_MAX_CONNECTIONS = 64
_MAX_CONNECTIONS_PER_UID = 8
_CRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class _Grant:
    uid: int | None
    fd: int
    size: int
    expires: float


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, from the kernel."""
    return _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def side_socket_path(address: str, runtime_dir: Path) -> Path:
    """Where the side socket of a daemon at ``address`` lives."""
    if address.startswith("ipc://"):
        return Path(address[len("ipc://"):] + ".fd")
    name = "".join(c if c.isalnum() or c == "." else "-" for c in address[len("tcp://"):])
    return runtime_dir / f"tcp-{name}.fd"


class FdBroker:
    """The side socket and its thread; see the module docstring."""

    def __init__(self, path: Path, allowed_uids: set[int], shared: bool = False) -> None:
        if len(os.fsencode(path)) > 107:
            raise OSError(f"the side socket path {path} is longer than a unix socket allows "
                          "(107 bytes): choose a shorter --address")
        self.path = path
        self.allowed_uids = frozenset(allowed_uids)
        self._lock = threading.Lock()
        self._tickets: dict[bytes, tuple[int, float]] = {}
        self._grants: dict[bytes, _Grant] = {}
        self.num_refused = 0
        self._num_open: dict[int, int] = {}   # connections being served, per uid
        path.unlink(missing_ok=True)   # a dead daemon's (the instance lock is held)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        # Shared: other users may connect; who gets an answer is decided per uid.
        os.chmod(path, 0o666 if shared else 0o600)
        self._sock.listen(64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvstore-fd-broker", daemon=True)
        self._thread.start()

    # ---- the daemon's loop side ---------------------------------------------------------
    def redeem_ticket(self, ticket: bytes) -> int | None:
        """The uid a ticket was issued to, once; None if unknown or expired."""
        with self._lock:
            found = self._tickets.pop(ticket, None)
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def grant(self, uid: int | None, fd: int, size: int) -> bytes:
        """A one-time secret that hands ``fd`` (a segment of ``size`` bytes) to a process
        of ``uid`` (any process holding the secret when ``uid`` is None)."""
        secret = secrets.token_bytes(16)
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            # A Hello flood expires its own pool's grants (oldest first), not another
            # tenant's: at most _MAX_PENDING_PER_SEGMENT per segment, then the table's cap.
            same = [k for k, g in self._grants.items() if g.fd == fd]
            if len(same) >= _MAX_PENDING_PER_SEGMENT:
                del self._grants[same[0]]
            elif len(self._grants) >= _MAX_PENDING:
                self._grants.pop(next(iter(self._grants)))
            self._grants[secret] = _Grant(uid, fd, size, now + TTL_S)
        return secret

    def forget_fd(self, fd: int) -> None:
        """Drop the grants of a segment being closed (its fd is about to go)."""
        with self._lock:
            for key in [k for k, g in self._grants.items() if g.fd == fd]:
                del self._grants[key]

    def _prune(self, now: float) -> None:
        for table in (self._tickets, self._grants):
            for key in [k for k, v in table.items()
                        if (v[1] if isinstance(v, tuple) else v.expires) < now]:
                del table[key]

    # ---- the thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.2)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            # One thread per connection, bounded in all and per uid: a slow or hostile
            # peer cannot hold the side socket for other clients.
            try:
                uid = peer_credentials(conn)[1]
            except OSError:
                conn.close()
                continue
            with self._lock:
                busy = self._num_open.get(uid, 0)
                if sum(self._num_open.values()) >= _MAX_CONNECTIONS or busy >= _MAX_CONNECTIONS_PER_UID:
                    self.num_refused += 1
                    conn.close()
                    continue
                self._num_open[uid] = busy + 1
            threading.Thread(target=self._serve_one, args=(conn, uid), daemon=True,
                             name="kvstore-side-request").start()

    def _serve_one(self, conn: socket.socket, uid: int) -> None:
        try:
            with conn:
                conn.settimeout(_IO_TIMEOUT_S)
                try:
                    self._handle(conn)
                except OSError as exc:   # a client that went away or stalled: its loss
                    log.debug("side socket request failed: %s", exc)
                except Exception:  # noqa: BLE001 - the broker must outlive one bad request
                    log.exception("side socket request failed")
        finally:
            with self._lock:
                left = self._num_open[uid] - 1
                if left:
                    self._num_open[uid] = left
                else:
                    del self._num_open[uid]

    def _handle(self, conn: socket.socket) -> None:
        pid, uid, _ = peer_credentials(conn)
        deadline = time.monotonic() + _REQUEST_DEADLINE_S
        # the whole request first: a refusal must reach the client
        op = _recv_exact(conn, 1, deadline)
        secret = _recv_exact(conn, 16, deadline) if op == b"F" else b""
        if uid not in self.allowed_uids:
            self.num_refused += 1
            conn.sendall(b"E" + f"uid {uid} may not use this daemon (its owner can admit it: "
                         "kvstore serve --allow-users)".encode())
            return
        if op == b"T":
            ticket = secrets.token_bytes(16)
            now = time.monotonic()
            with self._lock:
                self._prune(now)
                if len(self._tickets) >= _MAX_PENDING:
                    self._tickets.pop(next(iter(self._tickets)))
                self._tickets[ticket] = (uid, now + TTL_S)
            conn.sendall(b"K" + ticket)
        elif op == b"F":
            with self._lock:
                grant = self._grants.pop(secret, None)
            if grant is None or grant.expires < time.monotonic():
                self.num_refused += 1
                conn.sendall(b"E" + b"unknown or expired segment secret: send Hello again")
            elif grant.uid is not None and grant.uid != uid:
                self.num_refused += 1
                log.warning("uid %d (pid %d) presented the segment secret of uid %d: refused",
                            uid, pid, grant.uid)
                conn.sendall(b"E" + b"this secret was issued to another user")
            else:
                socket.send_fds(conn, [b"K" + struct.pack("<Q", grant.size)], [grant.fd])
        else:
            conn.sendall(b"E" + b"unknown request")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _recv_exact(conn: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError("the client sent its side-socket request too slowly")
        conn.settimeout(left)
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("the client closed the side socket mid-request")
        data += chunk
    return data
