"""DaemonClient: the CacheClient API against a ``kvstore serve`` daemon.

    from controller import connect_daemon
    cache = connect_daemon("ipc:///run/user/1000/kvstore/kvstore.sock", namespace, engine.kv_pool)

Only page keys, slot numbers and lease ids cross the socket. The client
computes page keys itself, maps the daemon's shared-memory segment and moves
page bytes between it and the engine's device pool with the copy backends of
``kvstore.copy_ops`` on its own device (pinned with cudaHostRegister on CUDA).

Liveness and restarts:
- a heartbeat thread (its own socket) keeps the session alive; a client silent
  for ``lease_ttl_s`` keeps its leases and reservations while the daemon sees its
  process alive (paused), and loses them if the daemon cannot watch it (another pid
  namespace; see controller/daemon/sessions.py);
- every request has a deadline (``request_timeout_s``); after a timeout the socket
  is replaced, so a late reply or a queued request never reaches a new daemon;
- a reply from a new daemon instance, or "unknown session", drops the old
  mapping and leases (load of an old result raises LoadError: recompute), attaches
  again and retries once;
- fail open, fast (``controller.liveness``): the first request that times out marks
  the daemon down (one WARNING); until a background Ping on its own socket is
  answered (one INFO), every request fails at once, so lookups are misses, stores
  skipped pages and prefetches no-ops within milliseconds; then the session
  re-attaches by itself. ``DaemonClient.link_health()`` shows it;
- every copy is fenced (``kvstore.slot_fence``): a lease carries its slots'
  generations and the client checks them once the copy has completed, so a slot the
  daemon reused during the copy makes the load a LoadError (or the store unpublished),
  never a silent success; before copying it also makes sure the daemon heard from it
  within half the TTL.

Prefetch: the daemon never waits on L3 inside a request. A lookup that finds
pages only in L3 gets the L2 hit plus a running prefetch; the client applies its
own ``PrefetchConfig.policy`` by waiting on that prefetch (WaitPrefetch, answered
by the daemon when it is done or the budget ends, while it serves others) and
looking up again. ``sync`` behaves as ``wait_complete`` here; ``auto`` plans with
the client's own cost model (controller/client_choice.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import zmq

from controller.api import (CacheClient, CacheError, CacheStats, LoadError, LoadHandle,
                            LookupResult, PrefetchTicket, StoreResult)
from controller.arguments import page_id_list, token_array
from controller.client_choice import ClientChoice
from controller.config import PrefetchConfig
from controller.daemon import protocol as p
from controller.daemon.address import parse_address
from controller.device_pool import DevicePool
from controller.liveness import DaemonDown, DaemonUnavailable, DaemonWatch, LinkHealth  # noqa: F401
from controller.load_handle import CompletedLoad, ControllerLoad
from controller.pending_stores import PendingStore, PendingStores
from controller.process_identity import own_identity
from controller.segment import attach_segment
from controller.tenant_link import PinnedPrefix, fetch_ticket, receive_segment
from kvstore.host_pool import generations_view, segment_bytes
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace, PageKeyCache
from kvstore.slot_fence import SlotFence

log = logging.getLogger(__name__)


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
            sent = time.monotonic()
            reply, instance = self._request(msg, self.hello.session, timeout_s)
            if type(reply) is p.ErrorReply and reply.code == "unknown_session":
                self.hello = None
                if attempt == 0:
                    continue
            elif instance == self.instance:
                self.last_ack_sent = sent
            return reply
        return reply

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


class _Heartbeat(threading.Thread):
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


class _MappedPool:
    """The daemon's host pool, mapped into this process (page_first, like HostPool.tensor)."""

    def __init__(self, hello: p.HelloReply, layout: KVLayout, pin: bool) -> None:
        size = hello.num_slots * hello.slot_bytes
        needed = segment_bytes(hello.num_slots, hello.slot_bytes)
        # CacheError saying why it cannot be mapped, or is too small
        if hello.fd_secret:   # a tenant's segment: handed over as a descriptor, no name
            self._shm, self._mmap = None, receive_segment(hello.fd_socket, hello.fd_secret, needed)
            buf = memoryview(self._mmap)
        else:
            self._shm, self._mmap = attach_segment(hello.segment_name, needed), None
            buf = self._shm.buf
        self.layout = layout.with_arrangement("page_first")
        if hello.slot_bytes != self.layout.page_bytes:
            self._release(buf)
            raise CacheError(f"segment {hello.segment_name} does not hold {hello.num_slots} pages of "
                             f"layout {layout.fingerprint()}")
        self._bytes = np.ndarray((size,), dtype=np.uint8, buffer=buf)
        self.generations = generations_view(buf, hello.num_slots, hello.slot_bytes)
        self.tensor = (torch.from_numpy(self._bytes).view(self.layout.torch_dtype)
                       .view(self.layout.pool_shape(hello.num_slots)))
        self.is_pinned = False
        self._prefix = None
        if pin and self._mmap is not None:   # a sparse tenant segment: pinned as it is used
            self._prefix = PinnedPrefix(self.tensor.data_ptr(), size, hello.slot_bytes)
            self.is_pinned = self._prefix.cover(0)
        elif pin:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), size, 0x01 | 0x02)
            if int(err) != 0:
                log.warning("cudaHostRegister of the daemon's segment failed (%d); copies are "
                            "not DMA (raise ulimit -l)", int(err))
            self.is_pinned = int(err) == 0

    def prepare_slots(self, slots: bytes) -> None:
        """Before a device copy names ``slots`` (a reply's uint32 blob): pin the segment up
        to them (tenant segments are pinned as they are used, ``tenant_link.PinnedPrefix``)."""
        if self._prefix is not None and not self._prefix.cover(int(np.frombuffer(slots, "<u4").max())):
            raise CacheError("cudaHostRegister of the daemon's segment failed: raise ulimit -l")

    def _release(self, buf: memoryview | None = None) -> None:
        try:
            if self._mmap is not None:
                if buf is not None:
                    buf.release()
                self._mmap.close()
            else:
                self._shm.close()
        except BufferError:
            log.warning("daemon segment still viewed by a live tensor; it is unmapped when that goes")
        self._shm = self._mmap = None

    def close(self) -> None:
        if self._shm is None and self._mmap is None:
            return
        if self._prefix is not None:
            self._prefix.close()
        elif self.is_pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        del self.tensor, self._bytes, self.generations
        self._release()


class DaemonLink:
    """An attached session with the daemon's segment mapped, kept alive by heartbeats:
    what every daemon-backed handle needs (DaemonClient; the engine adapters' keyed
    cache). Knows no device pool. Not thread-safe.

    ``on_remap`` runs when the session was lost (daemon restart, client reaped) and
    the segment is mapped anew: whatever the handle held of the old one is gone."""

    def __init__(self, address: str, layout: KVLayout, *, credentials: Credentials = Credentials(),
                 request_timeout_s: float = 10.0, client_name: str | None = None, pin: bool = False,
                 prefetch: PrefetchConfig = PrefetchConfig(),
                 on_remap: Callable[[], None] = lambda: None) -> None:
        self.layout = layout
        self.prefetch_config = prefetch
        self.choice = ClientChoice(prefetch, layout.page_size, layout.page_bytes)
        self.session = Session(address, layout.fingerprint(), credentials=credentials,
                               request_timeout_s=request_timeout_s, client_name=client_name,
                               layout=layout, pins_memory=pin)
        self.pool: _MappedPool | None = None
        self._pool_epoch = -1
        self._pin = pin
        self._on_remap = on_remap
        try:
            self.session.attach()
            self.ensure_mapped()
        except BaseException:
            self.session.close()
            raise
        self._heartbeat = _Heartbeat(self.session)
        self._heartbeat.start()

    @property
    def epoch(self) -> int:
        """Changes whenever the session was opened anew (a lease of another epoch is gone)."""
        return self.session.epoch

    def ensure_mapped(self) -> None:
        """Map the current instance's segment; tell the handle when the old one is gone."""
        s = self.session
        if s.hello is None:
            s.attach()
        if self._pool_epoch == s.epoch and self.pool is not None:
            return
        self._on_remap()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.pool = _MappedPool(s.hello, self.layout, pin=self._pin)
        self._pool_epoch = s.epoch

    def call(self, msg: p.Message, timeout_s: float | None = None) -> p.Message:
        reply = self.session.call(msg, timeout_s)
        self.ensure_mapped()
        if type(reply) in (p.LookupReply, p.StorePlanReply) and reply.slots:
            self.pool.prepare_slots(reply.slots)   # slots a device copy will name
        return reply

    def require_fresh(self) -> None:
        """Raise unless the daemon surely still holds this session's leases and reservations.

        The daemon reclaims a session ``lease_ttl_s`` after the last request it got; the
        send time of the latest answered request is a lower bound of that."""
        s = self.session
        if s.hello is None or self._pool_epoch != s.epoch:
            raise CacheError("the daemon lost this client's session; lookup() again")
        if time.monotonic() - s.last_ack_sent > s.hello.lease_ttl_s / 2:
            epoch = s.epoch
            reply = s.call(p.Heartbeat(), timeout_s=s.hello.lease_ttl_s / 4)
            if type(reply) is not p.OkReply or s.epoch != epoch or s.hello is None:
                raise CacheError("this client's leases were reclaimed by the daemon; lookup() again")

    # ---- requests shared by the handles ---------------------------------------------------
    def lookup(self, keys: list[bytes], num_tokens: int) -> p.LookupReply:
        """Lease the cached prefix of ``keys``, waiting on the daemon's prefetch of L3
        pages as ``prefetch_config.policy`` says. Raises DaemonUnavailable, CacheError."""
        reply = self._lookup_once(keys, start_prefetch=True)
        if reply.num_pending:
            self.choice.refresh(self.call)   # the L3 rates a wait plans with (hits: at release)
        if reply.num_pending and self._wait_for_prefetch(reply, num_tokens):
            # Look again for what arrived (counted with the first as one lookup); the
            # first lease ends once the second holds.
            again = self._lookup_once(keys, start_prefetch=False, follows=reply.prefetch_id)
            self.release_lease(reply.lease_id)
            num_l2 = min(reply.num_l2, again.num_l2 + again.num_l3)
            reply = dataclasses.replace(again, num_l2=num_l2,
                                        num_l3=again.num_l2 + again.num_l3 - num_l2)
        chosen = self.choice.choose(reply, num_tokens)   # auto may keep fewer pages
        if chosen.lease_id and not chosen.num_l2 + chosen.num_l3:
            self.release_lease(chosen.lease_id)
            chosen = dataclasses.replace(chosen, lease_id=0)
        return chosen

    def _lookup_once(self, keys: list[bytes], start_prefetch: bool, follows: int = 0) -> p.LookupReply:
        reply = self.call(p.Lookup(p.join_keys(keys), start_prefetch, follows))
        if type(reply) is p.ErrorReply:
            raise CacheError(f"lookup refused by the daemon: {reply.code}: {reply.message}")
        if type(reply) is not p.LookupReply or reply.num_l2 + reply.num_l3 > len(keys) \
                or len(reply.slots) != 4 * (reply.num_l2 + reply.num_l3):
            raise CacheError("the daemon's lookup reply does not match the request")
        return reply

    def _wait_for_prefetch(self, reply: p.LookupReply, num_tokens: int) -> bool:
        """Wait on a prefetch as the policy says; whether to look up again."""
        cfg, prefetch_id = self.prefetch_config, reply.prefetch_id
        if cfg.policy == "best_effort" or not prefetch_id:
            return False
        if cfg.policy == "auto":
            return self.choice.wait(reply, num_tokens, self.call_prefetch, self.session.request_timeout_s)
        budget = (self.session.request_timeout_s if cfg.policy != "timeout" else
                  cfg.timeout_base_s + cfg.timeout_per_1k_tokens_s * num_tokens / 1000)
        reply = self.call_prefetch(p.WaitPrefetch(prefetch_id, budget), budget)
        return type(reply) is p.PrefetchReply and reply.num_ready > 0

    def call_prefetch(self, msg: p.Message, wait_s: float = 0.0) -> p.Message:
        """A prefetch request, whose answer may take ``wait_s`` on top of the usual deadline."""
        return self.session.call(msg, timeout_s=wait_s + self.session.request_timeout_s)

    def release_lease(self, daemon_lease_id: int) -> None:
        if not daemon_lease_id:
            return
        try:
            self.choice.refresh(self.call)   # counts and rates, once a second, off the TTFT path
            self.session.call(p.Release(daemon_lease_id))
        except DaemonUnavailable:
            pass  # the daemon reclaims it with the session

    def abort_store(self, reservation_id: int) -> None:
        try:
            self.session.call(p.AbortStore(reservation_id))
        except CacheError:
            pass  # the daemon aborts it after reservation_ttl_s, or has restarted

    @property
    def health(self) -> LinkHealth:
        """Whether the daemon answers this client, and its outages so far."""
        return self.session.watch.health()

    def daemon_stats(self) -> dict:
        reply = self.call(p.GetStats())
        if type(reply) is not p.StatsReply:
            raise CacheError(f"stats refused: {reply}")
        return reply.stats

    def cache_stats(self) -> CacheStats:
        """The daemon's cache counters (shared by every client of the daemon), this
        client's counts of what its lookups handed out sent first."""
        self.choice.refresh(self.call, force=True)
        raw = self.daemon_stats()
        return CacheStats(**{f.name: type(f.default)(raw.get(f.name, 0))
                             for f in dataclasses.fields(CacheStats)})

    def check_integrity(self, quiescent: bool = False) -> None:
        """Run the daemon's integrity check; raises CacheError with its finding."""
        reply = self.call(p.CheckIntegrity(quiescent))
        if type(reply) is not p.OkReply:
            raise CacheError(f"daemon integrity check failed: {reply.message}")

    def close(self) -> None:
        """Say Goodbye (the daemon ends every lease), stop the heartbeat, unmap. Idempotent."""
        try:   # the last counts; a daemon that is gone gets a short try
            self.choice.send_counts(lambda msg: self.session.call(msg, timeout_s=1.0))
        except CacheError as exc:
            log.info("counts of the last lookups not sent: %s", exc)
        self._heartbeat.stop_event.set()
        self._heartbeat.join(timeout=5)
        try:
            self.session.close()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None


class _RemotePrefetch(PrefetchTicket):
    """A prefetch running in the daemon; progress is asked for when read, until done."""

    def __init__(self, link: DaemonLink, reply: p.PrefetchReply | None) -> None:
        self._link = link
        self._last = reply or p.PrefetchReply(0, 0, 0, 0, 0, True)

    def _refresh(self, wait_s: float = 0.0) -> p.PrefetchReply:
        if not self._last.is_done:
            try:
                reply = self._link.call_prefetch(p.WaitPrefetch(self._last.prefetch_id, wait_s), wait_s)
            except DaemonUnavailable:
                reply = None
            # A daemon that forgot it (restart, reaped) has nothing more coming.
            self._last = reply if type(reply) is p.PrefetchReply else \
                dataclasses.replace(self._last, num_pending=0, is_done=True)
        return self._last

    @property
    def num_pages(self) -> int:
        return self._refresh().num_pages

    @property
    def num_ready(self) -> int:
        return self._refresh().num_ready

    @property
    def num_failed(self) -> int:
        return self._refresh().num_failed

    @property
    def num_pending(self) -> int:
        return self._refresh().num_pending

    @property
    def is_done(self) -> bool:
        return self._refresh().is_done

    def wait(self, timeout_s: float | None = None) -> bool:
        wait_s = self._link.session.request_timeout_s * 6 if timeout_s is None else timeout_s
        return self._refresh(wait_s).is_done

    def cancel(self) -> None:
        if not self._last.is_done:
            try:
                self._link.call_prefetch(p.CancelPrefetch(self._last.prefetch_id))
            except DaemonUnavailable:
                pass
            self._last = dataclasses.replace(self._last, is_done=True)


class _Reserved(NamedTuple):
    """A daemon reservation being written (what ``_publish`` needs)."""

    reservation_id: int
    fence: SlotFence
    num_skipped: int


@dataclasses.dataclass
class _Lease:
    result: LookupResult
    slots: list[int]
    generations: bytes
    """Of ``slots`` as leased (LookupReply.generations): the fence of every load."""
    epoch: int
    loads: list[ControllerLoad]
    daemon_lease_id: int


class DaemonClient(CacheClient):
    """An engine's handle on a daemon's cache; same contract as the embedded controller."""

    def __init__(self, address: str, namespace: KeyNamespace, device_pool: torch.Tensor, *,
                 copy_backend: str | None = None, credentials: Credentials = Credentials(),
                 request_timeout_s: float = 10.0, client_name: str | None = None,
                 prefetch: PrefetchConfig = PrefetchConfig()) -> None:
        self.layout: KVLayout = namespace.layout
        self._device = DevicePool(self.layout, device_pool, copy_backend)
        self._ns_digest = namespace.digest()
        # A next turn resends the last prompt: only its new pages are hashed.
        self._key_cache = PageKeyCache(self.layout.page_size)
        self._leases: dict[int, _Lease] = {}   # this client's lease id -> lease
        self._lost_lease_ids: set[int] = set()
        self._pending = PendingStores(self._publish,
                                      lambda store: self._link.abort_store(store.plan.reservation_id))
        self._lease_ids = itertools.count(1)
        self._is_closed = False
        self._link = DaemonLink(address, self.layout, credentials=credentials,
                                request_timeout_s=request_timeout_s, client_name=client_name,
                                pin=device_pool.is_cuda, prefetch=prefetch,
                                on_remap=self._drop_leases)

    def _check_open(self) -> None:
        if self._is_closed:
            raise CacheError("this cache client is closed; connect again")

    def _drop_leases(self, reason: str = "the daemon lost this client's session") -> None:
        """The daemon dropped them with the session: loads of them end too, and their
        waits raise LoadError (the engine recomputes)."""
        for lease in self._leases.values():
            for handle in lease.loads:
                handle.abandon(reason)
        # Remembered (ids only, until released) so load() can tell "lost" from "released".
        self._lost_lease_ids.update(self._leases)
        self._leases.clear()

    def _keys(self, tokens) -> list[bytes]:
        return self._key_cache.keys(self._ns_digest, token_array(tokens))

    # ---- the API ------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        self._check_open()
        keys = self._keys(tokens)
        P = self.layout.page_size
        if not keys:
            return LookupResult(0, (), P, 0, 0)
        self._pending.publish_done(wanted=keys)
        try:
            reply = self._link.lookup(keys, len(keys) * P)
        except DaemonUnavailable as exc:
            log.debug("lookup is a miss: %s", exc)  # DaemonWatch logs the outage once
            return LookupResult(0, (), P, 0, 0)
        num_hit = reply.num_l2 + reply.num_l3
        # The result carries an id of this client's own: a restarted daemon numbers its
        # leases from 1 again, and an old result must never name a new lease.
        local_id = next(self._lease_ids) if reply.lease_id else 0
        result = LookupResult(local_id, tuple(keys[:num_hit]), P, reply.num_l2, reply.num_l3,
                              reply.num_pending)
        if reply.lease_id:
            self._leases[local_id] = _Lease(result, p.unpack_u32(reply.slots), reply.generations,
                                            self._link.epoch, [], reply.lease_id)
        return result

    def report_prefill(self, num_tokens: int, num_cached: int, seconds: float,
                       load_wait_s: float = 0.0) -> None:
        cost = self._link.choice.cost
        cost.observe_prefill(num_tokens, num_cached, seconds)
        if num_cached:
            cost.observe_l2_load(num_cached // self.layout.page_size * self.layout.page_bytes, load_wait_s)

    def prefetch(self, tokens: Sequence[int] | np.ndarray) -> PrefetchTicket:
        self._check_open()
        keys = self._keys(tokens)
        try:
            reply = self._link.call_prefetch(p.StartPrefetch(p.join_keys(keys))) if keys else None
        except DaemonUnavailable as exc:
            log.debug("prefetch not started: %s", exc)
            reply = None
        if type(reply) is p.ErrorReply:
            raise CacheError(f"prefetch refused by the daemon: {reply.code}: {reply.message}")
        return _RemotePrefetch(self._link, reply if type(reply) is p.PrefetchReply else None)

    def load(self, result: LookupResult, device_pages: Sequence[int]) -> LoadHandle:
        self._check_open()
        device_pages = page_id_list(device_pages, "load() device_pages")
        if len(device_pages) != result.num_hit_pages:
            raise CacheError(f"load() needs one device page per hit page: got {len(device_pages)} "
                             f"for {result.num_hit_pages} hit pages")
        if not result.num_hit_pages:
            return CompletedLoad(self.layout.num_layers)
        self._pending.publish_done()
        pages = self._device.check_pages(device_pages, "device_pages")
        try:
            self._link.require_fresh()
        except CacheError as exc:
            # The session was lost (and this lease with it): the engine recomputes.
            raise LoadError(f"load() of lease {result.lease_id} failed: {exc}",
                            range(result.num_hit_pages)) from None
        lease = self._leases.get(result.lease_id)
        if lease is None and result.lease_id in self._lost_lease_ids:
            raise LoadError(f"lease {result.lease_id} was lost with the daemon session (daemon "
                            "restarted, or this client was silent): recompute its pages",
                            range(result.num_hit_pages))
        if lease is None or lease.result != result or lease.epoch != self._link.epoch:
            raise CacheError(f"lease {result.lease_id} has ended (released): lookup() again "
                             "before load()")
        pool = self._link.pool
        fence = SlotFence(pool.generations, lease.slots, np.frombuffer(lease.generations, "<u4"))
        handle = self._device.load(pool, lease.slots, pages, fence)
        lease.loads.append(handle)
        return handle

    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int]) -> StoreResult:
        """See ``CacheClient.store``. On CUDA this returns once the device-to-host copy is
        enqueued (the engine may reuse its pages at once: ``DevicePool.start_save``); the
        pages are committed by a later call that finds the copy complete, or by close.
        ``num_new_pages`` then counts the pages being written."""
        self._check_open()
        self._pending.publish_done()
        keys = self._keys(tokens)
        device_pages = page_id_list(device_pages, "store() device_pages")
        if len(device_pages) < len(keys):
            raise CacheError(f"store() got {len(device_pages)} device pages for {len(keys)} full "
                             "pages of tokens")
        if not keys:
            return StoreResult(0, 0, 0)
        pages = self._device.check_pages(device_pages[: len(keys)], "device_pages")
        try:
            plan = self._link.call(p.BeginStore(p.join_keys(keys)))
        except DaemonUnavailable as exc:
            log.debug("store skipped: %s", exc)
            return StoreResult(len(keys), 0, len(keys))
        if type(plan) is p.ErrorReply:
            raise CacheError(f"store refused by the daemon: {plan.code}: {plan.message}")
        if not plan.reservation_id:
            return StoreResult(len(keys), 0, plan.num_skipped)
        positions, slots = p.unpack_u32(plan.positions), p.unpack_u32(plan.slots)
        try:
            if len(positions) != len(slots) or len(plan.generations) != 4 * len(slots) \
                    or max(positions) >= len(keys):
                raise CacheError("the daemon's store plan does not match the request")
            self._link.require_fresh()
            pool = self._link.pool
            fence = SlotFence(pool.generations, slots, np.frombuffer(plan.generations, "<u4"))
            copy = self._device.start_save([pages[i] for i in positions], pool, slots)
        except DaemonUnavailable:  # went down meanwhile: fail open, the store is skipped
            return StoreResult(len(keys), 0, len(keys))
        except BaseException:
            self._link.abort_store(plan.reservation_id)
            raise
        store = PendingStore(keys, _Reserved(plan.reservation_id, fence, plan.num_skipped), copy)
        if not copy.is_done():
            # CUDA: the copy runs behind this call; published by a later call once done.
            self._pending.add(store)
            return StoreResult(len(keys), len(slots), plan.num_skipped)
        num_published = self._publish(store)
        if num_published is None:
            return StoreResult(len(keys), 0, len(keys) - plan.num_skipped)
        return StoreResult(len(keys), num_published, plan.num_skipped)

    def _publish(self, store: PendingStore) -> int | None:
        """Commit a store whose copy has completed; the pages published, or None if it
        could not be (its slots changed owner, the daemon refused or did not answer)."""
        reserved = store.plan
        if not self._owns_slots(reserved.fence):
            self._link.abort_store(reserved.reservation_id)
            return None
        try:
            reply = self._link.session.call(p.CommitStore(reserved.reservation_id))
        except DaemonUnavailable as exc:
            log.debug("store not published: %s", exc)  # DaemonWatch logs the outage once
            return None
        if type(reply) is not p.CommitReply:
            log.warning("store not published: %s", getattr(reply, "message", reply))
            return None
        return reply.num_published

    @staticmethod
    def _owns_slots(fence: SlotFence) -> bool:
        """After a store's copy: whether every reserved slot is still this client's. The
        daemon keeps a live writer's slots, so this fails only past an orphan quarantine."""
        bad = fence.bad_positions()
        if bad:
            log.error("store skipped: %d reserved slot(s) were given to another writer while this "
                      "client was silent past orphan_quarantine_s; nothing is published", len(bad))
        return not bad

    def release(self, result: LookupResult) -> None:
        self._check_open()
        lease = self._leases.get(result.lease_id)
        if lease is None:
            self._lost_lease_ids.discard(result.lease_id)
            return
        if lease.result != result:
            raise CacheError(f"release() got a result that is not lease {result.lease_id} of this cache")
        del self._leases[result.lease_id]
        for handle in lease.loads:
            handle.finish()  # copies out of the slots must be over before the lease ends
        if lease.epoch == self._link.epoch:
            self._link.release_lease(lease.daemon_lease_id)

    def stats(self) -> CacheStats:
        """The daemon's cache counters (shared by every client of the daemon)."""
        self._check_open()
        self._pending.publish_done()
        return self._link.cache_stats()

    def daemon_stats(self) -> dict:
        self._check_open()
        self._pending.publish_done()
        return self._link.daemon_stats()

    def link_health(self) -> LinkHealth:
        """This client's view of the daemon: up or down, outages, requests failed fast.
        Answered locally (``stats()`` asks the daemon, and fails fast while it is down)."""
        self._check_open()
        return self._link.health

    @property
    def num_pending_stores(self) -> int:
        """Stores whose copies were in flight at the last call (not yet visible)."""
        return len(self._pending)

    def check_integrity(self, quiescent: bool = False) -> None:
        """Run the daemon's integrity check (after the stores in flight, when ``quiescent``);
        raises CacheError with its finding."""
        self._check_open()
        self._pending.publish_done(wait=quiescent)
        self._link.check_integrity(quiescent)

    def close(self) -> None:
        """Publish the stores in flight, release every lease (Goodbye), stop the heartbeat,
        unmap the segment. Idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            self._pending.publish_done(wait=True)
        finally:
            self._drop_leases()
            self._link.close()
