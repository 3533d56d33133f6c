"""The daemon: one ROUTER socket, one thread that owns the CacheCore, a life cycle like uvicorn's.

    startup:   claim the address (lock file; stale socket/segment of a dead daemon removed),
               create the CacheCore (host pool in shm + L3), bind, start metrics
    main loop: poll; serve every frame that has arrived; once per tick reap silent
               clients and overdue reservations and refresh the gauges
    shutdown:  (SIGTERM/SIGINT) stop accepting, serve what already arrived, close every
               session, write back due pages to L3 up to a deadline, remove segment,
               socket and lock; exit 0

Requests are served one at a time in arrival order by the loop thread, so the
cache needs no locks; replies carry the daemon's instance id (random per start)
so a client notices a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import threading
import time
from typing import Callable

import zmq

from controller.core import CacheCore
from controller.daemon import protocol as p
from controller.daemon.admission import FreshSessions
from controller.daemon.auth import TokenCheck, bind_ipc, start_curve
from controller.daemon.config import DaemonConfig
from controller.daemon.lookup_counts import LookupCounts
from controller.daemon.metrics import DaemonMetrics, l3_health_fields
from controller.daemon.runtime import InstanceLock
from controller.daemon.sessions import ClientSession, SessionTable
from controller.process_identity import ProcessIdentity


log = logging.getLogger("kvstore.daemon")

_TICK_S = 0.1
_HARD_MAX_FRAME = 64 << 20
"""zmq drops peers sending more than this; frames between MAX_FRAME_BYTES and this get an error."""
_MAX_BATCH = 256
_DRAIN_S = 1.0
_MAX_SESSIONS = 4096
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WARN_INTERVAL_S = 10.0


class DaemonServer:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.instance_id = secrets.token_bytes(p.ID_BYTES)
        self.metrics = DaemonMetrics()
        self.should_exit = threading.Event()
        self.core = None
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
            self.core = CacheCore(cfg.controller_config(), cfg.layout)
            self._lock.record(os.getpid(), self.core.pool.name)
            self.sessions = SessionTable(self.core, cfg.lease_ttl_s, cfg.reservation_ttl_s,
                                         cfg.heartbeat_interval_s, cfg.orphan_quarantine_s)
            self.lookup_counts = LookupCounts(self.metrics, self.core.pool.slot_bytes)
            self._bind()
            if cfg.metrics_port is not None:
                self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        except BaseException:
            self._teardown(flush_deadline_s=None)
            raise
        pool = self.core.pool
        log.info("kvstore daemon %s (pid %d) listening on %s", self.instance_id.hex()[:8],
                 os.getpid(), cfg.address)
        log.info("host pool: segment %s, %d pages of %d bytes (%.1f MiB), layout %s, policy %s",
                 pool.name, pool.num_slots, pool.slot_bytes, pool.num_slots * pool.slot_bytes / 2**20,
                 cfg.layout.fingerprint(), cfg.eviction_policy)
        log.info("L3: %s", f"{cfg.l3.connector} ({cfg.l3.write_policy}) {dict(cfg.l3.options)}"
                 if cfg.l3.connector else "none")

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
            bind_ipc(sock, self.config.address)

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
        steps = [self._close_socket, lambda: self.sessions and self.sessions.close_all(),
                 lambda: self._close_core(flush_deadline_s), self.metrics.close,
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
        if self.core is None:
            return
        start = time.monotonic()
        report = self.core.close(flush_deadline_s)
        self.metrics.flush_seconds.observe(time.monotonic() - start)
        if report is not None and report.num_failed:
            log.warning("shutdown flush: wrote %d pages back to L3, %d pages LOST (not written within "
                        "flush_deadline_s=%.1f s, or refused by L3); what was written is usable "
                        "(parents first)", report.num_written, report.num_failed,
                        self.config.flush_deadline_s)
        elif report is not None and report.num_written:
            log.info("wrote %d pages back to L3", report.num_written)
        self.core = None

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
        m, s, pool = self.metrics, self.sessions, self.core.pool
        self.lookup_counts.close_ended(s.sessions)
        m.clients.set(len(s.sessions))
        m.leases.set(s.num_leases)
        m.reservations.set(s.num_reservations)
        m.suspended.set(s.num_suspended)
        m.quarantined.set(s.num_quarantined_slots)
        m.refresh_core(dataclasses.asdict(self.core.stats()), pool.num_free, pool.num_reserved,
                       pool.num_slots)
        m.refresh_l3(self.core.l3_health())

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
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            served += 1
            if len(parts) != 2:
                self._count_bad("bad_message")
                if len(parts) > 1:
                    self._send(parts[0], p.ErrorReply("bad_message", "send one frame per request"), 0)
                continue
            identity, frame = parts
            reply, request_id = self._handle(frame, identity)
            if reply is not None:   # None: a WaitPrefetch answered later
                self._send(identity, reply, request_id)
        return served

    def _send(self, identity: bytes, reply: p.Message, request_id: int) -> None:
        try:
            self._socket.send_multipart([identity, p.encode(reply, request_id, self.instance_id)],
                                        zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply to a client dropped: its queue is full")

    def _handle(self, frame: bytes, identity: bytes = b"") -> tuple[p.Message | None, int]:
        try:
            msg, request_id, session_id = p.decode(frame, p.REQUESTS)
        except p.ProtocolError as exc:
            self._count_bad(exc.code)
            return p.ErrorReply(exc.code, str(exc)[:500]), 0
        self.metrics.requests.labels(type(msg).__name__).inc()
        try:
            if type(msg) is p.Hello:
                return self._admit(self._hello(msg), identity), request_id
            if type(msg) is p.Ping:
                return self._pong(), request_id
            session = self.sessions.sessions.get(session_id)
            if session is None:
                self._refuse("unknown_session")
                return p.ErrorReply("unknown_session", "no such session (the daemon restarted or "
                                    "reclaimed it): send Hello again"), request_id
            self._fresh.graduate(session_id)
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

    def _hello(self, msg: p.Hello) -> p.Message:
        if not self._tokens.is_allowed(msg.token):
            self._refuse("bad_token")
            log.warning("refused client %r (pid %d): wrong or missing token", msg.client_name, msg.pid)
            return p.ErrorReply("unauthorized", "wrong or missing token")
        fingerprint = self.config.layout.fingerprint()
        if msg.layout_fingerprint != fingerprint:
            self._refuse("bad_layout")
            return p.ErrorReply("bad_layout", f"this daemon serves layout {fingerprint}, the client "
                                f"has {msg.layout_fingerprint}; start a daemon for that layout")
        if self._is_full():
            self._refuse("too_many_clients")
            return p.ErrorReply("limit", f"{_MAX_SESSIONS} clients are attached; try again later")
        session = self.sessions.open(
            msg.client_name, ProcessIdentity(msg.pid, msg.pid_start_ticks, msg.pid_namespace))
        pool, cfg = self.core.pool, self.config
        if session.is_watched:
            log.info("client %r (pid %d) attached", msg.client_name, msg.pid)
        else:
            self._warn_unwatched(msg)
        return p.HelloReply(session.session_id, pool.name, pool.num_slots, pool.slot_bytes,
                            fingerprint, cfg.lease_ttl_s, cfg.heartbeat_interval_s,
                            cfg.reservation_ttl_s)

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
        if self._is_tcp:  # no session: tell a stranger nothing about the host
            return p.PongReply(0, "", self.config.layout.fingerprint())
        return p.PongReply(os.getpid(), self.core.pool.name, self.config.layout.fingerprint())

    def _lookup(self, session: ClientSession, msg: p.Lookup) -> p.Message:
        if len(session.leases) >= self.config.max_leases_per_client:
            return p.ErrorReply("limit", f"client holds {len(session.leases)} leases: release some")
        start = time.perf_counter()
        keys = p.split_keys(msg.keys)
        first = self.lookup_counts.take(session.session_id, msg.follows)
        # Never wait on L3 here: the client waits (WaitPrefetch) while others are served.
        num_l2, num_l3, num_pending, ticket = self.core.lookup(
            keys, wait=False, start_prefetch=msg.start_prefetch,
            num_counted=first.num_hit if first is not None else None)
        num_hit = num_l2 + num_l3
        if num_hit:
            hit = keys[:num_hit]
            hit_slots = self.core.slot_array(hit)   # packed as arrays, no list per page
            slots = hit_slots.astype(p.SLOT_DTYPE).tobytes()
            gens = self.core.pool.generations[hit_slots].astype(p.SLOT_DTYPE, copy=False).tobytes()
            lease_id = self.sessions.add_lease(session, hit)
        else:
            slots, gens, lease_id = b"", b"", 0
        prefetch_id = self.sessions.add_prefetch(session, ticket) if num_pending else 0
        self.lookup_counts.observe(session.session_id, len(keys), num_l2, num_l3, num_pending,
                                   prefetch_id, first, start)
        return p.LookupReply(lease_id, num_l2, num_l3, slots, num_pending, prefetch_id, gens)

    # ---- prefetch -----------------------------------------------------------------------
    def _start_prefetch(self, session: ClientSession, msg: p.StartPrefetch) -> p.Message:
        ticket = self.core.prefetch(p.split_keys(msg.keys))
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
        plan = self.core.begin_store(keys)
        self.metrics.store_pages["skipped"].inc(plan.num_skipped)
        if not plan.positions:
            return p.StorePlanReply(0, b"", b"", plan.num_skipped, b"")
        res_id = self.sessions.add_reservation(session, keys, plan)
        gens = self.core.pool.generations[list(plan.slots)]
        return p.StorePlanReply(res_id, p.pack_u32(plan.positions), p.pack_u32(plan.slots),
                                plan.num_skipped, p.pack_u32(gens))

    def _commit_store(self, session: ClientSession, msg: p.CommitStore) -> p.Message:
        found = self.sessions.take_reservation(session, msg.reservation_id)
        if found is None:
            return p.ErrorReply("unknown_reservation", f"reservation {msg.reservation_id} is not "
                                "open (aborted after reservation_ttl_s, or never made)")
        published = self.core.commit_store(found.keys, found.plan)
        self.metrics.store_pages["published"].inc(published)
        return p.CommitReply(published)

    def _abort_store(self, session: ClientSession, msg: p.AbortStore) -> p.Message:
        found = self.sessions.take_reservation(session, msg.reservation_id)
        if found is not None:
            self.core.abort_store(found.plan)
            self.metrics.store_pages["aborted"].inc(len(found.plan.slots))
        return p.OkReply()

    def _count_loads(self, session: ClientSession, msg: p.CountLoads) -> p.Message:
        self.core.count_loaded(msg.num_l2, msg.num_l3)
        self.core.count_recomputed_by_choice(msg.num_recomputed)
        return p.OkReply()

    def _ok(self, session: ClientSession, msg: p.Message) -> p.Message:
        return p.OkReply()

    def _goodbye(self, session: ClientSession, msg: p.Goodbye) -> p.Message:
        self.sessions.close(session)
        log.info("client %r (pid %d) detached", session.name, session.pid)
        return p.OkReply()

    def _check_integrity(self, session: ClientSession, msg: p.CheckIntegrity) -> p.Message:
        try:
            self.core.check_integrity(msg.quiescent)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, not fatal here
            return p.ErrorReply("integrity", f"{type(exc).__name__}: {exc}"[:500])
        return p.OkReply()

    def _stats(self, session: ClientSession, msg: p.GetStats) -> p.Message:
        stats = {k: v for k, v in dataclasses.asdict(self.core.stats()).items()
                 if type(v) in (int, float)}
        pool = self.core.pool
        stats.update(
            pid=os.getpid(), instance=self.instance_id.hex(), address=self.config.address,
            segment=pool.name, layout=self.config.layout.fingerprint(),
            num_slots=pool.num_slots, slot_bytes=pool.slot_bytes, num_free_slots=pool.num_free,
            num_reserved_slots=pool.num_reserved, num_cached_pages=len(self.core.host.index),
            num_clients=len(self.sessions.sessions), num_leases=self.sessions.num_leases,
            num_reservations=self.sessions.num_reservations,
            num_bad_messages=sum(self._bad.values()),
            num_refused=int(sum(m.value for m in _samples(self.metrics.refused))),
            num_reaped_clients=int(self.metrics.reaped_clients._value.get()),
            num_fresh_clients=len(self._fresh), num_evicted_fresh_clients=self._fresh.num_evicted,
            l3=self.config.l3.connector or "none",
        )
        stats.update(l3_health_fields(self.core.l3_health()))
        return p.StatsReply(stats)


def _progress(prefetch_id: int, ticket) -> p.PrefetchReply:
    return p.PrefetchReply(prefetch_id, ticket.num_pages, ticket.num_ready, ticket.num_failed,
                           ticket.num_pending, ticket.is_done)


def _samples(counter) -> list:
    return [s for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]
