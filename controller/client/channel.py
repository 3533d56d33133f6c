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


class Channel:
    """One DEALER socket with request ids and a deadline per request (not thread-safe)."""

    def __init__(self, address: str, credentials: Credentials, context: zmq.Context) -> None:
        self.address = address
        self._credentials = credentials
        self._context = context
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self.num_timeouts = 0
        """Requests that got no reply within their deadline."""

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
        request_id = next(self._ids)
        deadline = time.monotonic() + timeout_s
        try:
            self._socket.send(p.encode(msg, request_id, session), zmq.NOBLOCK)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._socket.poll(left * 1000):
                    break
                reply, reply_id, instance = p.decode(self._socket.recv(), p.REPLIES)
                if reply_id == request_id or (reply_id == 0 and type(reply) is p.ErrorReply):
                    return reply, instance
                # else: a late reply to a request we gave up on; skip it
        except zmq.Again:
            pass
        except p.ProtocolError as exc:
            self.reset()
            raise CacheError(f"the daemon at {self.address} sent a bad reply: {exc}") from None
        self.reset()  # queued requests must not reach whoever listens here next
        self.num_timeouts += 1
        raise DaemonUnavailable(f"no reply from the kvstore daemon at {self.address} within "
                                f"{timeout_s:.1f} s (is `kvstore serve` running?)")

    def reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
