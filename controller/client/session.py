"""An attached session with the daemon (Hello, re-attach once) and its heartbeat thread.

The heartbeat has a socket (and a thread) of its own: it never queues behind, or
delays, a request on the session's socket.
"""

from __future__ import annotations

import os
import threading
import time

import zmq

from controller.api import CacheError
from controller.client.channel import Channel, Credentials
from controller.daemon import protocol as p
from controller.daemon.address import parse_address
from controller.liveness import DaemonUnavailable, DaemonWatch
from controller.process_identity import own_identity
from controller.tenant_link import fetch_ticket
from kvstore.layout import KVLayout


class Session:
    """An attached session: Hello, the daemon's answers, and requests that re-attach once
    when the daemon restarted or forgot this client. Used by DaemonClient, ``kvstore
    status``, tests and benches; knows nothing about device pools."""

    def __init__(self, address: str, layout_fingerprint: str | None = None, *,
                 credentials: Credentials = Credentials(), request_timeout_s: float = 10.0,
                 client_name: str | None = None, layout: KVLayout | None = None,
                 pins_memory: bool = False) -> None:
        self.address = parse_address(address).url   # a malformed one would wait forever
        self.layout = layout
        """Sent in Hello: the daemon builds this tenant's pool of it (None: stats only)."""
        self.pins_memory = pins_memory
        self.credentials = credentials
        self.request_timeout_s = request_timeout_s
        self.client_name = client_name or f"pid-{os.getpid()}"
        self._context = zmq.Context()
        self.channel = Channel(address, credentials, self._context)
        self.watch = DaemonWatch(address, self._probe, self._close_probe, request_timeout_s)
        """Up or down; while down, requests fail at once (``controller.liveness``)."""
        self._probe_channel: Channel | None = None
        self.layout_fingerprint = layout_fingerprint
        self.hello: p.HelloReply | None = None
        self.instance: bytes | None = None
        self.epoch = 0
        """Bumped whenever the session (and every lease and reservation) was lost."""
        self.last_ack_sent = 0.0
        """monotonic send time of the latest request the daemon answered."""
        self._unconfirmed: list[p.Message] = []
        """Sent without waiting since the last answered request (Releases): a channel reset
        drops what is still queued, so they go again (ending a lease twice is harmless;
        lease ids are not reused within a daemon's life) unless the session was lost."""
        self._unconfirmed_epoch = 0
        self._unconfirmed_resets = 0   # the channel's resets when they were sent

    def _request(self, msg: p.Message, session: bytes, timeout_s: float) -> tuple[p.Message, bytes]:
        """``channel.request``, refused at once while the daemon is down; a timeout marks
        it down (so the engine waits at most one timeout)."""
        self.watch.check()
        try:
            return self.channel.request(msg, session, timeout_s)
        except DaemonUnavailable as exc:
            self.watch.mark_down(str(exc))
            raise

    def _probe(self, timeout_s: float) -> None:
        """On the probe thread: Ping on a socket of its own (and a context of its own, so
        closing this session never waits on it)."""
        if self._probe_channel is None:
            self._probe_context = zmq.Context()
            self._probe_channel = Channel(self.address, self.credentials, self._probe_context)
        try:
            reply, _ = self._probe_channel.request(p.Ping(), b"", timeout_s)
        except zmq.ZMQError as exc:
            raise CacheError(f"probe of {self.address} failed: {exc}") from None
        if type(reply) is not p.PongReply:
            raise CacheError(f"probe of {self.address} got {type(reply).__name__}")

    def _close_probe(self) -> None:
        channel, self._probe_channel = self._probe_channel, None
        if channel is not None:
            channel.reset()
            self._probe_context.term()

    def ping(self) -> p.PongReply:
        reply, _ = self._request(p.Ping(), b"", self.request_timeout_s)
        if type(reply) is not p.PongReply:
            raise CacheError(f"ping of {self.address} failed: {reply}")
        return reply

    def attach(self) -> p.HelloReply:
        if self.layout_fingerprint is None:
            self.layout_fingerprint = self.ping().layout_fingerprint
        me = own_identity()
        spec = p.layout_spec(self.layout) if self.layout is not None else ()
        hello = p.Hello(self.client_name[:200], me.pid & 0xFFFFFFFF, self.layout_fingerprint,
                        self.credentials.token, me.start_ticks, me.pid_namespace, spec,
                        fetch_ticket(self.address, self.request_timeout_s), self.pins_memory)
        sent = time.monotonic()
        reply, instance = self._request(hello, b"", self.request_timeout_s)
        if type(reply) is p.ErrorReply:
            raise CacheError(f"the kvstore daemon at {self.address} refused this client: "
                             f"{reply.code}: {reply.message}")
        if type(reply) is not p.HelloReply:
            raise CacheError(f"unexpected answer to Hello: {type(reply).__name__}")
        if self.instance is not None:
            self.epoch += 1
        self.hello, self.instance, self.last_ack_sent = reply, instance, sent
        return reply

    def call(self, msg: p.Message, timeout_s: float | None = None) -> p.Message:
        """Send ``msg`` in this session; re-attach and retry once if the daemon lost it.
        ErrorReply comes back as a value; DaemonUnavailable is raised."""
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        for attempt in range(2):
            if self.hello is None:
                self.attach()
            self._resend_unconfirmed()
            sent = time.monotonic()
            reply, instance = self._request(msg, self.hello.session, timeout_s)
            self._unconfirmed.clear()   # answered in order: what went before was served
            if type(reply) is p.ErrorReply and reply.code == "unknown_session":
                self.hello = None
                if attempt == 0:
                    continue
            elif instance == self.instance:
                self.last_ack_sent = sent
            return reply
        return reply

    def _resend_unconfirmed(self) -> None:
        if not self._unconfirmed or self._unconfirmed_resets == self.channel.num_resets:
            return   # none, or still queued on the live socket
        if self._unconfirmed_epoch != self.epoch:   # that session, and its leases, are gone
            self._unconfirmed.clear()
            return
        self._unconfirmed_resets = self.channel.num_resets
        for msg in self._unconfirmed:
            self.channel.send_only(msg, self.hello.session)

    def send_only(self, msg: p.Message) -> None:
        """Send ``msg`` in this session without waiting for its answer (a Release): the
        daemon serves this session's requests in order, so the next one finds it done.
        Nothing is sent while the daemon is down or no session is open (a lost session
        took its leases with it)."""
        if self.hello is None or self.watch.is_down:
            return
        if not self._unconfirmed or self._unconfirmed_epoch != self.epoch:
            self._unconfirmed.clear()
            self._unconfirmed_epoch, self._unconfirmed_resets = self.epoch, self.channel.num_resets
        if not self.channel.send_only(msg, self.hello.session):
            try:   # the socket's queue is full: wait for this one instead of losing it
                self.call(msg)
            except CacheError:
                pass   # the daemon is down: it reclaims the session's leases with it
            return
        if len(self._unconfirmed) < 4096:
            self._unconfirmed.append(msg)

    def close(self) -> None:
        self.watch.close()
        if self.hello is not None:
            try:
                self._request(p.Goodbye(), self.hello.session, min(self.request_timeout_s, 2.0))
            except CacheError:
                pass  # the daemon reclaims the session after lease_ttl_s
            self.hello = None
        self.channel.reset()
        self._context.term()


class Heartbeat(threading.Thread):
    """Says "alive" every heartbeat interval on a socket of its own."""

    def __init__(self, session: Session) -> None:
        super().__init__(name="kvstore-heartbeat", daemon=True)
        self._session = session
        self.stop_event = threading.Event()

    def run(self) -> None:
        s = self._session
        channel = Channel(s.address, s.credentials, s._context)
        try:
            while not self.stop_event.is_set():
                hello = s.hello
                interval = hello.heartbeat_interval_s if hello else 1.0
                if hello is not None and not s.watch.is_down:  # the probe finds it back
                    sent = time.monotonic()
                    try:
                        reply, instance = channel.request(p.Heartbeat(), hello.session, interval)
                        if type(reply) is p.OkReply and instance == s.instance and s.hello is hello:
                            s.last_ack_sent = max(s.last_ack_sent, sent)
                    except CacheError:
                        pass
                self.stop_event.wait(interval)
        finally:
            channel.reset()
