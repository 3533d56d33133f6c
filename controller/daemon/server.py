"""The daemon: one ROUTER socket, one thread that owns the cache pools, a life cycle like uvicorn's.

    startup:   claim the address (lock file; stale socket/segment of a dead daemon removed),
               create the pool registry (controller/daemon/pools.py: one CacheCore per
               tenant and layout, made at its first Hello; a legacy daemon's one pool in
               shm now), bind, start the side socket (fd_broker.py) and metrics
    main loop: poll; serve every frame that has arrived; once per tick reap silent
               clients and overdue reservations and refresh the gauges
    shutdown:  (SIGTERM/SIGINT) stop accepting, serve what already arrived, close every
               session, write back due pages to L3 up to a deadline, remove segment,
               socket and lock; exit 0

Requests are served one at a time in arrival order by the loop thread (the cores
share one lock with their L3 threads); a session belongs to one pool, and every
request works on its session's core. Replies carry the daemon's instance id
(random per start) so a client notices a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from typing import Callable

import zmq

from controller.config import ConfigError
from controller.daemon import protocol as p
from controller.daemon.admission import FreshSessions
from controller.daemon.auth import TokenCheck, bind_ipc, start_curve
from controller.daemon.config import DaemonConfig, runtime_dir
from controller.daemon.fd_broker import FdBroker, side_socket_path
from controller.daemon.lookup_counts import LookupCounts
from controller.daemon.metrics import DaemonMetrics, l3_health_fields
from controller.daemon.pools import PoolRegistry, merge_reports
from controller.daemon.runtime import InstanceLock
from controller.daemon.sessions import ClientSession, SessionTable
from controller.daemon.stats_view import core_stats_of, pools_entries
from controller.daemon.tenant_config import parse_tenants
from controller.events.publisher import NullPublisher, open_publisher
from controller.process_identity import ProcessIdentity
from kvstore.layout import KVLayout, LayoutError


log = logging.getLogger("kvstore.daemon")

_TICK_S = 0.1
_HARD_MAX_FRAME = 64 << 20
"""zmq drops peers sending more than this; frames between MAX_FRAME_BYTES and this get an error."""
_MAX_BATCH = 256
_DRAIN_S = 1.0
_MAX_SESSIONS = 4096
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WARN_INTERVAL_S = 10.0
_LEGACY_TENANT = "default"
"""The tenant of a one-layout daemon's clients, and of tcp clients of the shared token."""
_STATS_ONLY = (p.GetStats, p.Heartbeat, p.Goodbye, p.CheckIntegrity)


class DaemonServer:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.instance_id = secrets.token_bytes(p.ID_BYTES)
        self.metrics = DaemonMetrics()
        self.should_exit = threading.Event()
        self.pools: PoolRegistry | None = None
        self.broker: FdBroker | None = None
        self._tenants = parse_tenants(config.tenants, config.allow_users)
        self.events = NullPublisher()
        self.sessions: SessionTable | None = None
        self.lookup_counts: LookupCounts | None = None
        self._lock: InstanceLock | None = None
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._authenticator = None
        self._tokens = TokenCheck(config.auth.read_token())
        self._is_tcp = config.address.startswith("tcp://")
        self._handlers: dict[type, Callable] = {
            p.Lookup: self._lookup, p.Release: self._release, p.BeginStore: self._begin_store,
            p.CommitStore: self._commit_store, p.AbortStore: self._abort_store,
            p.Heartbeat: self._ok, p.GetStats: self._stats, p.Goodbye: self._goodbye,
            p.CheckIntegrity: self._check_integrity, p.StartPrefetch: self._start_prefetch,
            p.CancelPrefetch: self._cancel_prefetch, p.CountLoads: self._count_loads,
        }
        self._bad = {}
        self._num_unwatched, self._unwatched_logged_at = 0, float("-inf")
        self._fresh = FreshSessions()   # sessions that sent nothing but Hello (a flood's)
        self._request_counters: dict[type, object] = {}   # message type -> its requests counter
        # WaitPrefetch requests answered later: (deadline, identity, request_id, id, ticket)
        self._waiters: list[tuple[float, bytes, int, int, object]] = []

    # ---- life cycle -------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or ``should_exit``); the process exit status."""
        with self._signals_captured():
            self.startup()
            try:
                self.main_loop()
            finally:
                self.shutdown()
        return 0

    def startup(self) -> None:
        cfg = self.config
        self._lock = InstanceLock(cfg.address)  # raises AddressInUse next to a live daemon
        try:
            t = self._tenants
            self.events = open_publisher(cfg.events, cfg.events_replay, self.instance_id,
                                         cfg.events_topic, cfg.events_buffer_batches)
            self.pools = PoolRegistry(cfg.controller_config(), cfg.budget_bytes(), quotas=t.quotas,
                                      default_quota=t.default_quota, fixed_layout=cfg.layout,
                                      legacy=cfg.is_legacy,
                                      observers_for=lambda layout: self.events.core_events(layout.page_size))
            segment = ""
            if cfg.is_legacy:   # its one pool exists from the start, as it always did
                segment = self.pools.pool_for(_LEGACY_TENANT, cfg.layout).core.pool.name
            self._lock.record(os.getpid(), segment)
            self.sessions = SessionTable(None, cfg.lease_ttl_s, cfg.reservation_ttl_s,
                                         cfg.heartbeat_interval_s, cfg.orphan_quarantine_s)
            self.lookup_counts = LookupCounts(self.metrics)
            if not cfg.is_legacy:   # before the zmq socket: a client that gets a Pong finds it
                self.broker = FdBroker(side_socket_path(cfg.address, runtime_dir()),
                                       set(t.allowed_uids), shared=bool(cfg.allow_users))
            self._bind()
            if cfg.metrics_port is not None:
                self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        except BaseException:
            self._teardown(flush_deadline_s=None)
            raise
        log.info("kvstore daemon %s (pid %d) listening on %s", self.instance_id.hex()[:8],
                 os.getpid(), cfg.address)
        if cfg.is_legacy:
            pool = self.pools.pools[(_LEGACY_TENANT, cfg.layout.fingerprint())].core.pool
            log.info("host pool: segment %s, %d pages of %d bytes (%.1f MiB), layout %s, policy %s",
                     pool.name, pool.num_slots, pool.slot_bytes, pool.num_slots * pool.slot_bytes / 2**20,
                     cfg.layout.fingerprint(), cfg.eviction_policy)
        else:
            log.info("host pools: %.1f MiB for every (tenant, layout), %s, policy %s; segments "
                     "handed over on %s", cfg.budget_bytes() / 2**20,
                     f"layout {cfg.layout.fingerprint()} only" if cfg.layout else "any layout",
                     cfg.eviction_policy, self.broker.path)
        log.info("L3: %s", f"{cfg.l3.connector} ({cfg.l3.write_policy}) {dict(cfg.l3.options)}"
                 if cfg.l3.connector else "none")
        if cfg.events is not None:
            log.info("KV events on %s (replay: %s)", cfg.events, cfg.events_replay or "none")

    def _bind(self) -> None:
        self._context = zmq.Context()
        sock = self._socket = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _HARD_MAX_FRAME)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self.config.auth.is_curve:
            self._authenticator = start_curve(self._context, sock, self.config.auth,
                                              lambda: self._refuse("bad_curve_key"))
        if self._is_tcp:
            try:
                sock.bind(self.config.address)
            except zmq.ZMQError as exc:
                raise OSError(f"can't listen on {self.config.address}: {exc} (is another daemon "
                              "serving it?)") from None
        else:
            bind_ipc(sock, self.config.address, shared=bool(self.config.allow_users))

    def main_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        next_tick = 0.0
        while not self.should_exit.is_set():
            # While a client waits on a prefetch, look at it every millisecond.
            if poller.poll(1 if self._waiters else _TICK_S * 1000):
                self._serve_ready(_MAX_BATCH)
            if self._waiters:
                self._answer_waiters(time.monotonic())
            self.events.flush()   # one batch per iteration (nothing to send: a list check)
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + _TICK_S

    def shutdown(self) -> None:
        log.info("shutting down: draining requests, then flushing to L3 (up to %g s)",
                 self.config.flush_deadline_s)
        if self._socket is not None:
            end = time.monotonic() + _DRAIN_S
            while time.monotonic() < end and self._serve_ready(_MAX_BATCH):
                pass
        self._teardown(self.config.flush_deadline_s)

    def _teardown(self, flush_deadline_s: float | None) -> None:
        """Close sockets, sessions, cache (flush, L3, shm), metrics, lock: each even if one fails."""
        steps = [self._close_socket, lambda: self.broker and self.broker.close(),
                 lambda: self.sessions and self.sessions.close_all(),
                 lambda: self._close_core(flush_deadline_s), self.events.close, self.metrics.close,
                 lambda: self._lock and self._lock.release()]
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - the next steps must still run
                log.exception("shutdown step failed")

    def _close_socket(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def _close_core(self, flush_deadline_s: float | None) -> None:
        if self.pools is None:
            return
        start = time.monotonic()
        report = merge_reports(self.pools.close(flush_deadline_s))
        self.metrics.flush_seconds.observe(time.monotonic() - start)
        if report is not None and report.num_failed:
            log.warning("shutdown flush: wrote %d pages back to L3, %d pages LOST (not written within "
                        "flush_deadline_s=%.1f s, or refused by L3); what was written is usable "
                        "(parents first)", report.num_written, report.num_failed,
                        self.config.flush_deadline_s)
        elif report is not None and report.num_written:
            log.info("wrote %d pages back to L3", report.num_written)
        self.pools = None

    @contextlib.contextmanager
    def _signals_captured(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self.should_exit.is_set():
            log.warning("second %s: exiting without a flush", signal.Signals(sig).name)
            raise SystemExit(1)
        self.should_exit.set()

    def _tick(self, now: float) -> None:
        for event in self.sessions.reap(now):
            self._report_reap(event)
        m, s = self.metrics, self.sessions
        self.lookup_counts.close_ended(s.sessions)
        m.clients.set(len(s.sessions))
        m.leases.set(s.num_leases)
        m.reservations.set(s.num_reservations)
        m.suspended.set(s.num_suspended)
        m.quarantined.set(s.num_quarantined_slots)
        cores = [pool.core for pool in self.pools.pools.values()]
        m.refresh_core(core_stats_of(cores), sum(c.pool.num_free for c in cores),
                       sum(c.pool.num_reserved for c in cores), sum(c.pool.num_slots for c in cores))
        m.refresh_pools(self.pools.budget_bytes, self.pools.used_bytes, self.pools.describe(),
                        self.pools.tenants())
        m.refresh_l3(_first_l3_health(cores))

    def _report_reap(self, event) -> None:
        kind, session, num_leases, num_res = event
        who = f"client {session.name!r} (pid {session.pid})" if session is not None else ""
        if kind in ("gone", "released"):
            self.metrics.reclaimed.labels("lease").inc(num_leases)
            self.metrics.reclaimed.labels("reservation").inc(num_res)
        if kind == "gone":
            self.metrics.reaped_clients.inc()
            log.warning("%s exited without Goodbye: reclaimed %d leases, %d reservations",
                        who, num_leases, num_res)
        elif kind == "released":
            log.warning("quarantine over: %d reservations of orphaned clients return to the "
                        "cache", num_res)
        elif kind == "suspended":
            self.metrics.fence_events.labels("suspended").inc()
            log.warning("%s is silent but its process lives (paused?): its %d leases and %d "
                        "reservations are kept until it resumes or exits", who, num_leases, num_res)
        elif kind == "orphaned":
            self.metrics.reaped_clients.inc()
            self.metrics.fence_events.labels("orphaned").inc()
            log.warning("%s went silent and the daemon cannot watch its process (another pid "
                        "namespace?): session ended, %d leases released (its loads are fenced), "
                        "the slots of %d reservations quarantined", who, num_leases, num_res)
        elif kind == "overdue":
            self.metrics.fence_events.labels("overdue").inc(num_res)
            log.warning("%s has %d store(s) open for more than %.0f s; their slots stay its own "
                        "until it commits, aborts or exits", who, num_res, self.config.reservation_ttl_s)

    # ---- requests ---------------------------------------------------------------------
    def _serve_ready(self, limit: int) -> int:
        """Serve up to ``limit`` frames that have already arrived; how many were served."""
        sock = self._socket
        served = 0
        while served < limit:
            try:
                # With CURVE, the frames carry the client's key (its ZAP User-Id).
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=self._authenticator is None)
            except zmq.Again:
                break
            served += 1
            peer = ""
            if self._authenticator is not None:
                peer = parts[-1].get("User-Id") or ""
                parts = [part.bytes for part in parts]
            if len(parts) != 2:
                self._count_bad("bad_message")
                if len(parts) > 1:
                    self._send(parts[0], p.ErrorReply("bad_message", "send one frame per request"), 0)
                continue
            identity, frame = parts
            reply, request_id = self._handle(frame, identity, peer)
            if reply is not None:   # None: a WaitPrefetch answered later
                self._send(identity, reply, request_id)
        return served

    def _send(self, identity: bytes, reply: p.Message, request_id: int) -> None:
        try:
            self._socket.send_multipart([identity, p.encode(reply, request_id, self.instance_id)],
                                        zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply to a client dropped: its queue is full")

    def _handle(self, frame: bytes, identity: bytes = b"", peer: str = "") -> tuple[p.Message | None, int]:
        """``peer``: the client's CURVE public key (z85) where CURVE is on, else ""."""
        try:
            msg, request_id, session_id = p.decode(frame, p.REQUESTS)
        except p.ProtocolError as exc:
            self._count_bad(exc.code)
            return p.ErrorReply(exc.code, str(exc)[:500]), 0
        counter = self._request_counters.get(type(msg))
        if counter is None:   # (labels() costs a lock and a tuple per call: once per type)
            counter = self._request_counters[type(msg)] = self.metrics.requests.labels(type(msg).__name__)
        counter.inc()
        try:
            if type(msg) is p.Hello:
                return self._admit(self._hello(msg, peer), identity), request_id
            if type(msg) is p.Ping:
                return self._pong(), request_id
            session = self.sessions.sessions.get(session_id)
            if session is None:
                self._refuse("unknown_session")
                return p.ErrorReply("unknown_session", "no such session (the daemon restarted or "
                                    "reclaimed it): send Hello again"), request_id
            self._fresh.graduate(session_id)
            if session.core is None and type(msg) not in _STATS_ONLY:
                return p.ErrorReply("bad_layout", "this session named no layout (stats only): "
                                    "Hello with the engine's layout to use the cache"), request_id
            if self.sessions.touch(session):
                self.metrics.fence_events.labels("resumed").inc()
                log.info("client %r (pid %d) resumed; its leases and reservations stood",
                         session.name, session.pid)
            if type(msg) is p.WaitPrefetch:
                return self._wait_prefetch(session, msg, identity, request_id), request_id
            return self._handlers[type(msg)](session, msg), request_id
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the daemon
            log.exception("request %s failed", type(msg).__name__)
            return p.ErrorReply("internal", f"{type(exc).__name__}: {exc}"[:500]), request_id

    def _count_bad(self, code: str) -> None:
        self.metrics.bad_messages.labels(code).inc()
        self._bad[code] = self._bad.get(code, 0) + 1

    def _refuse(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()

    def _hello(self, msg: p.Hello, peer: str = "") -> p.Message:
        who = self._tenant_of(msg, peer)
        if type(who) is p.ErrorReply:
            return who
        tenant, uid = who
        layout = self._layout_of(msg)
        if type(layout) is p.ErrorReply:
            self._refuse("bad_layout")
            return layout
        if self._is_full():
            self._refuse("too_many_clients")
            return p.ErrorReply("limit", f"{_MAX_SESSIONS} clients are attached; try again later")
        pool = None
        if layout is not None:
            try:
                pool = self.pools.pool_for(tenant, layout)
            except (ConfigError, LayoutError, OSError) as exc:
                self._refuse("bad_layout")
                return p.ErrorReply("bad_layout", str(exc)[:500])
        session = self.sessions.open(
            msg.client_name, ProcessIdentity(msg.pid, msg.pid_start_ticks, msg.pid_namespace),
            core=pool.core if pool is not None else None, tenant=tenant, uid=uid)
        cfg = self.config
        if session.is_watched:
            log.info("client %r (pid %d) attached as tenant %s", msg.client_name, msg.pid, tenant)
        else:
            self._warn_unwatched(msg)
        if pool is None:   # stats only (kvstore status)
            return p.HelloReply(session.session_id, "", 0, 0, "", cfg.lease_ttl_s,
                                cfg.heartbeat_interval_s, cfg.reservation_ttl_s, tenant)
        host = pool.core.pool
        if msg.pins_memory and host.returns_memory:
            with self.pools.lock:
                host.returns_memory = False   # before it can map (and pin) the segment
            log.info("pool %s %s: a client pins it; freed slots keep their memory from now on",
                     tenant, pool.fingerprint)
        name, secret, side = host.name, b"", ""
        if host.is_memfd:
            from kvstore.host_pool import segment_bytes

            name, side = "", str(self.broker.path)
            secret = self.broker.grant(uid, host.fileno(), segment_bytes(host.num_slots,
                                                                         host.slot_bytes))
        return p.HelloReply(session.session_id, name, host.num_slots, host.slot_bytes,
                            pool.fingerprint, cfg.lease_ttl_s, cfg.heartbeat_interval_s,
                            cfg.reservation_ttl_s, tenant, secret, side)

    def _tenant_of(self, msg: p.Hello, peer: str = "") -> tuple[str, int | None] | p.ErrorReply:
        """(tenant, verified uid or None) of a Hello, or the refusal (tenant_config's doc)."""
        uid = None
        if msg.ticket and self.broker is not None:
            uid = self.broker.redeem_ticket(msg.ticket)
            if uid is None:
                self._refuse("bad_ticket")
                return p.ErrorReply("unauthorized", "the credentials ticket is unknown or expired "
                                    "(one use, 30 s): connect again")
        named = self._tenants.tenant_of_token(msg.token)
        if named is not None:
            return named, uid
        open_tcp = self._is_tcp and self._tokens.is_open and not self.config.auth.is_curve
        if not self._tokens.is_allowed(msg.token) or open_tcp:   # open_tcp: tenant tokens only
            self._refuse("bad_token")
            log.warning("refused client %r (pid %d): wrong or missing token", msg.client_name, msg.pid)
            return p.ErrorReply("unauthorized", "wrong or missing token")
        if self.config.is_legacy:
            return _LEGACY_TENANT, None
        if peer:   # completed the CURVE handshake with an admitted key
            return self._tenants.tenant_of_curve_key(peer), uid
        if uid is not None:
            return f"uid:{uid}", uid
        if self._is_tcp:
            return _LEGACY_TENANT, None
        self._refuse("no_ticket")
        return p.ErrorReply("unauthorized", "this daemon names tenants by uid: a client on ipc "
                            f"fetches a ticket from its side socket {self.broker.path} first; make "
                            "that path visible to the client next to the ipc socket (the same "
                            "mount), or give the client a tenant token")

    def _layout_of(self, msg: p.Hello) -> KVLayout | None | p.ErrorReply:
        """The layout a Hello names (None: a stats-only session), checked."""
        fixed = self.config.layout
        if msg.layout:
            layers, heads, dim, page, dtype, is_mla = msg.layout
            try:
                layout = KVLayout(layers, heads, dim, page, dtype=dtype, is_mla=is_mla)
            except LayoutError as exc:
                return p.ErrorReply("bad_layout", str(exc)[:500])
            if layout.fingerprint() != msg.layout_fingerprint:
                return p.ErrorReply("bad_layout", f"layout {layout.fingerprint()} and fingerprint "
                                    f"{msg.layout_fingerprint} disagree")
            if layout.page_bytes > self.pools.budget_bytes:
                return p.ErrorReply("bad_layout", f"a page of {layout.fingerprint()} takes "
                                    f"{layout.page_bytes} bytes, more than this daemon's budget")
            return layout
        if not msg.layout_fingerprint:
            return None
        if fixed is not None and msg.layout_fingerprint == fixed.fingerprint():
            return fixed   # a client that names its layout by fingerprint only
        served = fixed.fingerprint() if fixed is not None else "any layout sent in Hello"
        return p.ErrorReply("bad_layout", f"this daemon serves layout {served}, the client "
                            f"has {msg.layout_fingerprint}; start a daemon for that layout")

    def _is_full(self) -> bool:
        """Whether _MAX_SESSIONS established clients are attached (fresh ones never count:
        a flood of Hellos only churns their own bounded pool, ``admission``)."""
        live = self.sessions.sessions
        if len(live) < _MAX_SESSIONS:
            return False
        self._fresh.prune(live)
        return len(live) - len(self._fresh) >= _MAX_SESSIONS

    def _admit(self, reply: p.Message, identity: bytes) -> p.Message:
        """Track the session a Hello opened as fresh; close the fresh ones it displaces."""
        if type(reply) is p.HelloReply:
            live = self.sessions.sessions
            for session_id in self._fresh.add(reply.session, identity, live):
                self.sessions.close(live[session_id])
                self._refuse("idle_after_hello")
        return reply

    def _warn_unwatched(self, msg: p.Hello) -> None:
        """One WARNING per interval for clients whose process can't be watched (a flood of
        Hellos must not flood the log), with how many attached since the last one."""
        self._num_unwatched += 1
        now = time.monotonic()
        if now - self._unwatched_logged_at < _WARN_INTERVAL_S:
            return
        log.warning("client %r (pid %d) attached, but its process cannot be watched from here "
                    "(another pid namespace?): if it goes silent past lease_ttl_s its session "
                    "ends; share the pid namespace so a paused client keeps its leases (%d such "
                    "clients since the last such line)", msg.client_name, msg.pid, self._num_unwatched)
        self._unwatched_logged_at, self._num_unwatched = now, 0

    def _pong(self) -> p.Message:
        fixed = self.config.layout.fingerprint() if self.config.layout is not None else ""
        if self._is_tcp or not self.config.is_legacy:  # no session: tell a stranger nothing
            return p.PongReply(0 if self._is_tcp else os.getpid(), "", fixed)
        segment = self.pools.pools[(_LEGACY_TENANT, fixed)].core.pool.name
        return p.PongReply(os.getpid(), segment, fixed)

    def _lookup(self, session: ClientSession, msg: p.Lookup) -> p.Message:
        if len(session.leases) >= self.config.max_leases_per_client:
            return p.ErrorReply("limit", f"client holds {len(session.leases)} leases: release some")
        start = time.perf_counter()
        core = session.core
        keys = p.split_keys(msg.keys)
        first = self.lookup_counts.take(session.session_id, msg.follows)
        # Never wait on L3 here: the client waits (WaitPrefetch) while others are served.
        num_l2, num_l3, num_pending, ticket = core.lookup(
            keys, wait=False, start_prefetch=msg.start_prefetch,
            num_counted=first.num_hit if first is not None else None)
        num_hit = num_l2 + num_l3
        if num_hit:
            hit = keys[:num_hit]
            hit_slots = core.slot_array(hit)   # packed as arrays, no list per page
            slots = hit_slots.astype(p.SLOT_DTYPE).tobytes()
            gens = core.pool.generations[hit_slots].astype(p.SLOT_DTYPE, copy=False).tobytes()
            lease_id = self.sessions.add_lease(session, hit)
        else:
            slots, gens, lease_id = b"", b"", 0
        prefetch_id = self.sessions.add_prefetch(session, ticket) if num_pending else 0
        self.lookup_counts.observe(session.session_id, len(keys), num_l2, num_l3, num_pending,
                                   prefetch_id, first, start, core.pool.slot_bytes)
        return p.LookupReply(lease_id, num_l2, num_l3, slots, num_pending, prefetch_id, gens)

    # ---- prefetch -----------------------------------------------------------------------
    def _start_prefetch(self, session: ClientSession, msg: p.StartPrefetch) -> p.Message:
        ticket = session.core.prefetch(p.split_keys(msg.keys))
        if ticket is None:
            return p.PrefetchReply(0, 0, 0, 0, 0, True)
        return _progress(self.sessions.add_prefetch(session, ticket), ticket)

    def _wait_prefetch(self, session: ClientSession, msg: p.WaitPrefetch, identity: bytes,
                       request_id: int) -> p.Message | None:
        ticket = session.prefetches.get(msg.prefetch_id)
        if ticket is None:
            return p.ErrorReply("unknown_prefetch", f"prefetch {msg.prefetch_id} is not this "
                                "client's (or was forgotten): look up again")
        if ticket.is_done or msg.timeout_s <= 0:
            return _progress(msg.prefetch_id, ticket)
        self._waiters.append((time.monotonic() + msg.timeout_s, identity, request_id,
                              msg.prefetch_id, ticket))
        return None

    def _answer_waiters(self, now: float) -> None:
        waiting = []
        for waiter in self._waiters:
            deadline, identity, request_id, prefetch_id, ticket = waiter
            if ticket.is_done or now >= deadline:
                self._send(identity, _progress(prefetch_id, ticket), request_id)
            else:
                waiting.append(waiter)
        self._waiters = waiting

    def _cancel_prefetch(self, session: ClientSession, msg: p.CancelPrefetch) -> p.Message:
        ticket = session.prefetches.pop(msg.prefetch_id, None)
        if ticket is not None:
            ticket.request_cancel()   # slots go back once the read in flight has stopped
        return p.OkReply()

    def _release(self, session: ClientSession, msg: p.Release) -> p.Message:
        self.sessions.end_lease(session, msg.lease_id)
        return p.OkReply()

    def _begin_store(self, session: ClientSession, msg: p.BeginStore) -> p.Message:
        if len(session.reservations) >= 1024:
            return p.ErrorReply("limit", "client holds 1024 open reservations: commit or abort some")
        keys = p.split_keys(msg.keys)
        plan = session.core.begin_store(keys)
        self.metrics.store_pages["skipped"].inc(plan.num_skipped)
        if not plan.positions:
            return p.StorePlanReply(0, b"", b"", plan.num_skipped, b"")
        res_id = self.sessions.add_reservation(session, keys, plan)
        gens = session.core.pool.generations[list(plan.slots)]
        return p.StorePlanReply(res_id, p.pack_u32(plan.positions), p.pack_u32(plan.slots),
                                plan.num_skipped, p.pack_u32(gens))

    def _commit_store(self, session: ClientSession, msg: p.CommitStore) -> p.Message:
        found = self.sessions.take_reservation(session, msg.reservation_id)
        if found is None:
            return p.ErrorReply("unknown_reservation", f"reservation {msg.reservation_id} is not "
                                "open (aborted after reservation_ttl_s, or never made)")
        published = session.core.commit_store(found.keys, found.plan)
        self.metrics.store_pages["published"].inc(published)
        return p.CommitReply(published)

    def _abort_store(self, session: ClientSession, msg: p.AbortStore) -> p.Message:
        found = self.sessions.take_reservation(session, msg.reservation_id)
        if found is not None:
            session.core.abort_store(found.plan)
            self.metrics.store_pages["aborted"].inc(len(found.plan.slots))
        return p.OkReply()

    def _count_loads(self, session: ClientSession, msg: p.CountLoads) -> p.Message:
        session.core.count_loaded(msg.num_l2, msg.num_l3)
        session.core.count_recomputed_by_choice(msg.num_recomputed)
        return p.OkReply()

    def _ok(self, session: ClientSession, msg: p.Message) -> p.Message:
        return p.OkReply()

    def _goodbye(self, session: ClientSession, msg: p.Goodbye) -> p.Message:
        self.sessions.close(session)
        log.info("client %r (pid %d) detached", session.name, session.pid)
        return p.OkReply()

    def _check_integrity(self, session: ClientSession, msg: p.CheckIntegrity) -> p.Message:
        try:
            for core in self._visible_cores(session):
                core.check_integrity(msg.quiescent)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, not fatal here
            return p.ErrorReply("integrity", f"{type(exc).__name__}: {exc}"[:500])
        return p.OkReply()

    def _visible_cores(self, session: ClientSession) -> list:
        """The session's own pool; for a stats-only session, the pools it may see."""
        if session.core is not None:
            return [session.core]
        return [pool.core for pool in self._visible_pools(session)]

    def _visible_pools(self, session: ClientSession) -> list:
        """Every pool for the daemon's own user (and a legacy daemon), else the tenant's."""
        pools = list(self.pools.pools.values())
        if self.config.is_legacy or session.uid == os.getuid():
            return pools
        return [pool for pool in pools if pool.tenant == session.tenant]

    def _stats(self, session: ClientSession, msg: p.GetStats) -> p.Message:
        cores = self._visible_cores(session)
        stats = core_stats_of(cores)
        visible = self._visible_pools(session)
        tenants = self.pools.tenants()
        if not (self.config.is_legacy or session.uid == os.getuid()):
            tenants = {session.tenant: tenants[session.tenant]} if session.tenant in tenants else {}
        if session.core is not None:
            pool = session.core.pool
            segment, layout = pool.name, session.core.layout.fingerprint()
            num_slots, slot_bytes = pool.num_slots, pool.slot_bytes
        else:
            segment = layout = ""
            num_slots, slot_bytes = sum(c.pool.num_slots for c in cores), 0
        stats.update(
            pid=os.getpid(), instance=self.instance_id.hex(), address=self.config.address,
            segment=segment, layout=layout, tenant=session.tenant,
            num_slots=num_slots, slot_bytes=slot_bytes,
            num_free_slots=sum(c.pool.num_free for c in cores),
            num_reserved_slots=sum(c.pool.num_reserved for c in cores),
            num_cached_pages=sum(len(c.host.index) for c in cores),
            num_clients=len(self.sessions.sessions), num_leases=self.sessions.num_leases,
            num_reservations=self.sessions.num_reservations,
            num_bad_messages=sum(self._bad.values()),
            num_refused=int(sum(m.value for m in _samples(self.metrics.refused))),
            num_reaped_clients=int(self.metrics.reaped_clients._value.get()),
            num_fresh_clients=len(self._fresh), num_evicted_fresh_clients=self._fresh.num_evicted,
            l3=self.config.l3.connector or "none",
            budget_bytes=self.pools.budget_bytes,
            used_bytes=sum(pool.used_bytes for pool in visible), num_pools=len(visible),
            multi_layout=int(not self.config.is_legacy),
        )
        stats.update(pools_entries(self.pools.describe(), visible, tenants))
        stats.update(l3_health_fields(_first_l3_health(cores)))
        return p.StatsReply(stats)


def _first_l3_health(cores: list):
    """The L3 store's health as the first pool with one sees it (they share the store)."""
    for core in cores:
        health = core.l3_health()
        if health is not None:
            return health
    return None


def _progress(prefetch_id: int, ticket) -> p.PrefetchReply:
    return p.PrefetchReply(prefetch_id, ticket.num_pages, ticket.num_ready, ticket.num_failed,
                           ticket.num_pending, ticket.is_done)


def _samples(counter) -> list:
    return [s for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]
