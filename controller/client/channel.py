"""The client's transport: one DEALER socket per channel, request ids and deadlines."""

from __future__ import annotations

import dataclasses
import itertools
import time

import zmq

from controller.api import CacheError
from controller.daemon import protocol as p
from controller.liveness import DaemonUnavailable


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a tcp:// client presents: the shared token and/or CURVE keys (key files from
    ``zmq.auth.create_certificates``)."""

    token: bytes = b""
    curve_server_public_key_file: str | None = None
    curve_client_secret_key_file: str | None = None


_MAX_UNANSWERED = 64
"""Replies to requests sent without waiting that may queue before they are read (the
socket's receive queue holds 1,000)."""


class Channel:
    """One DEALER socket with request ids and a deadline per request (not thread-safe)."""

    def __init__(self, address: str, credentials: Credentials, context: zmq.Context) -> None:
        self.address = address
        self._credentials = credentials
        self._context = context
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self._num_unanswered = 0   # requests sent by send_only since the last request
        self.num_timeouts = 0
        """Requests that got no reply within their deadline."""
        self.num_resets = 0
        """Sockets closed with requests possibly still queued (they were dropped)."""

    def _open(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES * 2)
        creds = self._credentials
        if creds.curve_server_public_key_file:
            from zmq.auth import load_certificate

            server_public, _ = load_certificate(creds.curve_server_public_key_file)
            public, secret = load_certificate(creds.curve_client_secret_key_file)
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
        sock.connect(self.address)
        return sock

    def request(self, msg: p.Message, session: bytes, timeout_s: float) -> tuple[p.Message, bytes]:
        """(reply, instance id); raises DaemonUnavailable after ``timeout_s``."""
        if self._socket is None:
            self._socket = self._open()
        sock = self._socket
        request_id = next(self._ids)
        deadline = time.monotonic() + timeout_s
        try:
            sock.send(p.encode(msg, request_id, session), zmq.NOBLOCK)
            self._num_unanswered = 0   # their replies come first, and are skipped below
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # A blocking receive with a timeout: no poller built per request.
                sock.setsockopt(zmq.RCVTIMEO, max(1, int(left * 1000)))
                reply, reply_id, instance = p.decode(sock.recv(), p.REPLIES)
                if reply_id == request_id or (reply_id == 0 and type(reply) is p.ErrorReply):
                    return reply, instance
                # else: the reply to a request sent without waiting, or a late reply to a
                # request we gave up on; skip it
        except zmq.Again:
            pass
        except p.ProtocolError as exc:
            self.reset()
            raise CacheError(f"the daemon at {self.address} sent a bad reply: {exc}") from None
        self.reset()  # queued requests must not reach whoever listens here next
        self.num_timeouts += 1
        raise DaemonUnavailable(f"no reply from the kvstore daemon at {self.address} within "
                                f"{timeout_s:.1f} s (is `kvstore serve` running?)")

    def send_only(self, msg: p.Message, session: bytes) -> bool:
        """Send a request whose answer nobody waits for (a Release: its reply carries
        nothing). The daemon serves this socket's requests in order, so the next request
        finds it done; its reply is skipped by the next ``request``. False (nothing
        sent) when the socket's queue is full."""
        if self._socket is None:
            self._socket = self._open()
        if self._num_unanswered >= _MAX_UNANSWERED:
            self._drain()
        try:
            self._socket.send(p.encode(msg, next(self._ids), session), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._num_unanswered += 1
        return True

    def _drain(self) -> None:
        """Read the replies that have arrived (to requests sent without waiting)."""
        try:
            while True:
                self._socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._num_unanswered = 0

    def reset(self) -> None:
        self._num_unanswered = 0
        self.num_resets += 1
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
