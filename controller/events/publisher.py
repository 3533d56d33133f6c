"""The daemon's KV-event publisher: what its caches report, batched per loop iteration,
sent on a ZMQ PUB socket with a replay ROUTER beside it (controller/events/wire.py).

    cache (any thread, under its lock) --add--> pending list
    daemon loop, once per iteration --flush--> one batch payload --inproc--> publisher thread
    publisher thread: seq += 1, PUB [topic, seq, payload], ring of recent batches;
                      answers replay requests from the ring

The thread owns the PUB and ROUTER sockets (zmq sockets are not thread-safe), so
a slow replay never holds the request loop. The ring keeps the last
``buffer_batches`` batches and at most ``MAX_BUFFER_BYTES``: memory is bounded
whatever the subscribers do. The first batch (seq 0) of every incarnation is
``AllBlocksCleared``, and so is the last one at shutdown; an idle publisher sends
an empty batch every ``HEARTBEAT_S``.

When events are off the daemon holds a ``NullPublisher``: its caches get the null
observers of kvstore/index/observer.py and flush does nothing.
"""

from __future__ import annotations

import logging
import os
import socket as socket_module
import threading
import time
from collections import deque
from typing import Sequence

import zmq

from controller.events import wire
from kvstore.index.observer import NO_OBSERVERS, CoreObservers
from kvstore.page_keys import PageKey

log = logging.getLogger("kvstore.daemon.events")

MAX_BUFFER_BYTES = 256 << 20
"""The replay ring never holds more payload bytes than this (oldest batches go first)."""
HEARTBEAT_S = 1.0
"""An idle publisher sends an empty batch this often: a subscriber that (re)connected
after the last change still learns the incarnation and the sequence number (and
asks the replay for what it missed), and a silent stream means a dead daemon."""
_PUB_HWM = 100_000
_CLOSE_S = 2.0
_STOP = b""


class _Source:
    """A TierObserver that turns one tier's changes into events of ``medium``."""

    __slots__ = ("_add", "_medium", "_block_size")

    def __init__(self, publisher: "ZmqEventPublisher", medium: str, block_size: int) -> None:
        self._add, self._medium, self._block_size = publisher.add, medium, block_size

    def stored(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        if keys:
            self._add(wire.stored(list(keys), parent, self._medium, self._block_size))

    def removed(self, keys: Sequence[PageKey]) -> None:
        if keys:
            self._add(wire.removed(list(keys), self._medium))


class NullPublisher:
    """Events are off."""

    incarnation = ""

    def core_events(self, block_size: int) -> CoreObservers:
        return NO_OBSERVERS

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ZmqEventPublisher:
    """PUB + replay ROUTER for one daemon incarnation; see the module docstring."""

    def __init__(self, address: str, replay_address: str | None, incarnation: bytes,
                 topic: str = "", buffer_batches: int = 10_000,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        if buffer_batches <= 0:
            raise ValueError(f"events_buffer_batches must be > 0, got {buffer_batches}")
        self.incarnation = incarnation.hex()
        self.address, self.replay_address = address, replay_address
        self._topic = topic.encode()
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._ring_bytes = 0
        self._seq = 0
        self._heartbeat_s = heartbeat_s
        self.num_replays = 0
        self.num_bad_replay_requests = 0
        self._context = zmq.Context()
        try:
            self._open_sockets(buffer_batches)
        except BaseException:
            self._context.destroy(linger=0)
            raise
        self._thread = threading.Thread(target=self._run, name="kvstore-events", daemon=True)
        self._thread.start()
        self.add(wire.cleared())   # seq 0: whatever a subscriber knew of this node is gone
        self.flush()

    def _open_sockets(self, buffer_batches: int) -> None:
        ctx = self._context
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, _PUB_HWM)
        _bind(self._pub, self.address, "events")
        self._replay = None
        if self.replay_address is not None:
            self._replay = ctx.socket(zmq.ROUTER)
            # A full replay plus its end marker fits in the queue of a slow subscriber.
            self._replay.setsockopt(zmq.SNDHWM, 2 * (buffer_batches + 1))
            self._replay.setsockopt(zmq.MAXMSGSIZE, 1024)   # a request is 8 bytes
            _bind(self._replay, self.replay_address, "events_replay")
        # Never drop a batch between the loop and the thread (it would vanish without
        # a gap in the sequence); the thread never blocks, so this queue stays short.
        inproc = f"inproc://kvstore-events-{id(self)}"
        self._inbox = ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(inproc)
        self._outbox = ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.connect(inproc)

    def core_events(self, block_size: int) -> CoreObservers:
        """Observers for one CacheCore whose pages hold ``block_size`` tokens (a daemon
        with several cores calls this once per core; their events share the stream,
        told apart by their keys, which are salted with the namespace)."""
        return CoreObservers(_Source(self, wire.MEDIUM_L2, block_size),
                          _Source(self, wire.MEDIUM_L3, block_size))

    def add(self, event: dict) -> None:
        """Record one event for the next batch (any thread)."""
        with self._lock:
            self._pending.append(event)

    def flush(self) -> None:
        """Send what was recorded since the last flush as one batch (the loop thread,
        once per iteration; nothing to do costs one list check)."""
        if not self._pending:
            return
        with self._lock:
            events, self._pending = self._pending, []
        self._outbox.send(wire.encode_batch(events, self.incarnation))

    def close(self) -> None:
        """Publish AllBlocksCleared (this incarnation's host pool is going), send what is
        queued, stop the thread, close the sockets. Idempotent."""
        if self._context is None:
            return
        try:
            self.add(wire.cleared())
            self.flush()
            self._outbox.send(_STOP)
            self._thread.join(_CLOSE_S)
        finally:
            self._outbox.close(linger=0)
            self._context.destroy(linger=0)   # the thread's sockets closed with linger already
            self._context = None

    # ---- the publisher thread -------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        try:
            last_sent = time.monotonic()
            while True:
                ready = dict(poller.poll(self._heartbeat_s * 1000))
                if self._replay is not None and self._replay in ready:
                    self._serve_replay()
                if self._inbox in ready:
                    payload = self._inbox.recv()
                    if payload == _STOP:
                        return
                    self._publish(payload)
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= self._heartbeat_s:
                    self._publish(wire.encode_batch([], self.incarnation))
                    last_sent = time.monotonic()
        except zmq.ContextTerminated:
            return
        except Exception:  # noqa: BLE001 - events are advisory; the daemon keeps serving
            log.exception("KV-event publisher stopped")
        finally:
            self._close_thread_sockets()

    def _publish(self, payload: bytes) -> None:
        seq = self._seq
        self._seq += 1
        # PUB never blocks: a subscriber past its high-water mark loses messages and
        # sees a gap in the sequence (then asks the replay socket).
        self._pub.send_multipart((self._topic, wire.seq_frame(seq), payload))
        ring = self._ring
        if len(ring) == ring.maxlen:
            self._ring_bytes -= len(ring[0][1])
        ring.append((seq, payload))
        self._ring_bytes += len(payload)
        while self._ring_bytes > MAX_BUFFER_BYTES and len(ring) > 1:
            self._ring_bytes -= len(ring.popleft()[1])

    def _serve_replay(self) -> None:
        """Answer one replay request: [identity, b"", start seq] (vLLM's protocol)."""
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or frames[1] or len(frames[2]) != wire.SEQ_BYTES:
            self.num_bad_replay_requests += 1
            log.debug("ignored a malformed replay request (%d frames)", len(frames))
            return
        identity, start = frames[0], int.from_bytes(frames[2], "big")
        self.num_replays += 1
        try:
            for seq, payload in self._ring:
                if seq >= start:
                    self._replay.send_multipart((identity, b"", self._topic, wire.seq_frame(seq),
                                                 payload), zmq.NOBLOCK)
            self._replay.send_multipart((identity, b"", b"", wire.END_SEQ, b""), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("replay to a subscriber cut short: its queue is full")

    def _close_thread_sockets(self) -> None:
        self._pub.close(linger=int(_CLOSE_S * 1000))
        if self._replay is not None:
            self._replay.close(linger=0)
        self._inbox.close(linger=0)


def _bind(socket: zmq.Socket, address: str, setting: str) -> None:
    from controller.daemon.auth import bind_ipc

    try:
        if address.startswith("ipc://"):
            _refuse_live_ipc(address[len("ipc://"):], setting)
            bind_ipc(socket, address)
        else:
            socket.bind(address)
    except zmq.ZMQError as exc:
        raise OSError(f"can't publish KV events on {address} ({setting}): {exc} (is another "
                      "daemon using it?)") from None


def _refuse_live_ipc(path: str, setting: str) -> None:
    """zmq's ipc bind silently takes over a socket file another process listens on (two
    daemons given one events address would steal each other's subscribers): refuse
    a live one; a stale file (its daemon died) is replaced by the bind."""
    if not os.path.exists(path):
        return
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return   # nobody listens: stale
    finally:
        probe.close()
    raise OSError(f"can't publish KV events on ipc://{path} ({setting}): another process "
                  "listens there; give this daemon its own address")


def open_publisher(address: str | None, replay_address: str | None, incarnation: bytes,
                   topic: str = "", buffer_batches: int = 10_000):
    """A ZmqEventPublisher on ``address``, or a NullPublisher when it is None."""
    if address is None:
        return NullPublisher()
    return ZmqEventPublisher(address, replay_address, incarnation, topic, buffer_batches)
