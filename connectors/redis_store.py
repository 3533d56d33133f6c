"""Redis and Redis Cluster backends (redis.asyncio).

One value per page key, stored under `key_prefix + key`. Batches are one
round trip: MGET, a pipeline of SET [PX ttl], a pipeline of EXISTS, DEL. The
cluster backend sends one such pipeline per node (keys grouped by the node
owning their slot, all nodes at once), and a node that fails only fails its
own keys. SETs are written as RESP by hand so a page goes from the caller's
buffer to the socket without a joined copy (redis-py wants one bytes object
per value, and the frame is header + page).

Faults: the client does not retry (a retry against a dead server is the wait
we want to avoid); a failed call is a counted miss, the base class then fails
calls fast for `error_backoff_s`, and the connection pool reconnects on the
next call after that, so a restarted server is picked up by itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from connectors.base import Connector, ConnectorError

log = logging.getLogger(__name__)
_TRANSIENT = (redis.RedisError, OSError)
_TIMEOUTS = (TimeoutError, redis.TimeoutError)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _check_common(ttl_s: float | None, key_prefix: bytes | str) -> bytes:
    """Checks the options both backends share; returns the key prefix as bytes (a daemon's
    config file or JSON options can only give it as text)."""
    if ttl_s is not None and not ttl_s > 0:
        raise ConnectorError(f"ttl_s must be > 0 seconds or None, got {ttl_s!r}")
    if isinstance(key_prefix, str):
        key_prefix = key_prefix.encode()
    if not isinstance(key_prefix, bytes):
        raise ConnectorError(f"key_prefix must be bytes or str, got {type(key_prefix).__name__}")
    return key_prefix


def _resp_set(key: bytes, frame, ttl_ms: int | None) -> list:
    """RESP for SET key <head+payload> [PX ttl_ms] as chunks; the payload is
    passed through as is (a view, not copied)."""
    n = len(frame.head) + len(frame.payload)
    argc = 3 if ttl_ms is None else 5
    head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (argc, len(key), key, n)
    tail = b"\r\n"
    if ttl_ms is not None:
        ms = b"%d" % ttl_ms
        tail += b"$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ms), ms)
    return [head + bytes(frame.head), frame.payload, tail]


async def _send_packed(conn, chunks: list, num_replies: int) -> list:
    """Send a hand-packed pipeline on one connection and read its replies.

    An error reply (OOM, MOVED) is returned as that command's result; a
    broken stream (error, timeout or cancel mid-reply) disconnects the
    connection and raises.
    """
    try:
        await conn.send_packed_command(chunks, check_health=False)
        replies = []
        for _ in range(num_replies):
            try:
                replies.append(await conn.read_response())
            except redis.ResponseError as exc:   # the reply was read: the stream is fine
                replies.append(exc)
        return replies
    except BaseException:
        await conn.disconnect()
        raise


def _set_chunks(keys: list[bytes], frames, ttl_ms: int | None) -> list:
    chunks: list = []
    for k, f in zip(keys, frames):
        chunks += _resp_set(k, f, ttl_ms)
    return chunks


def _release(node, conn) -> None:
    """node.release(conn); ClusterNode has it since redis-py 6.2, before that
    a free connection just goes back on its queue."""
    release = getattr(node, "release", None)
    if release is not None:
        release(conn)
    else:
        node._free.append(conn)


async def _aclose(client) -> None:
    """client.aclose(); redis-py 5.0.0 has only the older close()."""
    close = getattr(client, "aclose", None) or client.close
    await close()


_GET_CONNECTION_ARGS: dict[type, tuple] = {}


def _get_connection_args(pool) -> tuple:
    """Arguments for pool.get_connection(): redis-py 5.0.0-5.2.x require a
    command name (unused by the pool); 5.3.0 made it optional and later
    versions warn when it is passed. Checked once per pool class."""
    args = _GET_CONNECTION_ARGS.get(type(pool))
    if args is None:
        try:
            params = list(inspect.signature(pool.get_connection).parameters.values())
        except (TypeError, ValueError):
            params = []
        needs_name = bool(params) and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
            and params[0].default is inspect.Parameter.empty
        args = ("SET",) if needs_name else ()
        _GET_CONNECTION_ARGS[type(pool)] = args
    return args


def _ok(reply) -> bool:
    return reply in (b"OK", "OK", True)


class RedisConnector(Connector):
    """Options: host, port, db, password, username, ttl_s (None = keep until
    deleted or evicted by the server), key_prefix (namespace inside a shared
    server), max_connections (connection pool size)."""

    # Measured fastest end to end (bench/l3.py, 32 x 2 MiB pages of decoder KV,
    # one redis-server on loopback, 2-core box): shuffle_zstd 137 ms put+get,
    # none 151, zstd 168, lz4 172. One redis-server thread moves ~1 GB/s, so
    # 1.30x fewer bytes beat the codec's CPU (which runs on codec_threads).
    default_codec = "shuffle_zstd"
    default_max_batch_keys = 32
    transient_errors = _TRANSIENT
    timeout_errors = _TIMEOUTS

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 password: str | None = None, username: str | None = None,
                 ttl_s: float | None = None, key_prefix: bytes | str = b"kvstore:",
                 max_connections: int = 16, **common) -> None:
        super().__init__(**common)
        self._prefix = _check_common(ttl_s, key_prefix)
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._r = aioredis.Redis(
            host=host, port=port, db=db, password=password, username=username,
            socket_timeout=self.timeout_s, socket_connect_timeout=min(self.timeout_s, 2.0),
            max_connections=max_connections, retry=_no_retry(), decode_responses=False)

    def _k(self, keys: list[bytes]) -> list[bytes]:
        return [self._prefix + k for k in keys]

    async def _raw_get_many(self, keys):
        return await self._r.mget(self._k(keys))

    async def _raw_put_many(self, keys, frames):
        """Pipelined SETs written as RESP by hand, so the page goes from the
        caller's buffer to the socket without a joined copy (redis-py would
        need header + payload as one bytes object)."""
        pool = self._r.connection_pool
        conn = await pool.get_connection(*_get_connection_args(pool))
        try:
            replies = await _send_packed(conn, _set_chunks(self._k(keys), frames, self._ttl_ms), len(keys))
        finally:
            await pool.release(conn)
        if any(isinstance(r, Exception) for r in replies):
            log.warning("redis: SETs refused: %s", next(r for r in replies if isinstance(r, Exception)))
        return [_ok(r) for r in replies]

    async def _raw_exists_many(self, keys):
        async with self._r.pipeline(transaction=False) as pipe:
            for k in self._k(keys):
                pipe.exists(k)
            return [bool(n) for n in await pipe.execute()]

    async def _raw_delete_many(self, keys):
        return await self._r.delete(*self._k(keys)) if keys else 0

    async def _on_corrupt(self, keys):
        await self._r.delete(*self._k(keys))

    async def _close(self):
        await _aclose(self._r)


class RedisClusterConnector(Connector):
    """Options: startup_nodes ([(host, port), ...]) or host + port of one node,
    password, username, ttl_s, key_prefix, max_connections (per node)."""

    # Measured fastest end to end with three servers sharing the load: none.
    default_codec = "none"
    default_max_batch_keys = 64
    transient_errors = _TRANSIENT
    timeout_errors = _TIMEOUTS

    def __init__(self, *, startup_nodes: list[tuple[str, int]] | None = None,
                 host: str | None = None, port: int | None = None,
                 password: str | None = None, username: str | None = None,
                 ttl_s: float | None = None, key_prefix: bytes | str = b"kvstore:",
                 max_connections: int = 16, **common) -> None:
        super().__init__(**common)
        prefix = _check_common(ttl_s, key_prefix)
        if startup_nodes is None and host is not None:
            startup_nodes = [(host, port or 6379)]
        if not startup_nodes:
            raise ConnectorError("redis_cluster needs startup_nodes=[(host, port), ...] or host/port")
        self._prefix = prefix
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._r = RedisCluster(
            startup_nodes=[ClusterNode(h, int(p)) for h, p in startup_nodes],
            password=password, username=username,
            socket_timeout=self.timeout_s, socket_connect_timeout=min(self.timeout_s, 2.0),
            max_connections=max_connections, retry=_no_retry(),
            decode_responses=False)

    async def _per_node(self, keys: list[bytes], pack) -> list:
        """One hand-packed pipeline per node owning the keys' slots, all nodes
        at once; pack(conn, prefixed_keys, indexes) gives the chunks. Returns
        a reply per key, None for keys of a node that failed (counted);
        raises when every node failed. A refused key (MOVED after a
        resharding) makes the client reload its slot map next call."""
        await self._r.initialize()
        prefixed = [self._prefix + k for k in keys]
        groups: dict = {}    # node name -> key indexes (ClusterNode is unhashable in redis-py <= 7.1)
        nodes: dict = {}
        for i, k in enumerate(prefixed):
            node = self._r.get_node_from_key(k)
            nodes.setdefault(node.name, node)
            groups.setdefault(node.name, []).append(i)

        async def one(node, idx: list[int]) -> list:
            conn = node.acquire_connection()
            try:
                return await _send_packed(conn, pack(conn, [prefixed[i] for i in idx], idx), len(idx))
            finally:
                _release(node, conn)

        results = await asyncio.gather(*(one(nodes[name], idx) for name, idx in groups.items()),
                                       return_exceptions=True)
        return self._merge(len(keys), list(groups.values()), results)

    def _merge(self, n: int, groups: list[list[int]], results: list) -> list:
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed:
            if not isinstance(exc, Exception):
                raise exc          # cancellation and the like: not a store fault
        if failed and len(failed) == len(results):
            raise failed[0]        # every node failed: a counted error for the call
        if failed:
            self._stats.errors += 1
            log.warning("redis cluster: %d of %d nodes failed: %s", len(failed), len(results), failed[0])
        out: list = [None] * n
        for idx, res in zip(groups, results):
            if not isinstance(res, BaseException):
                for i, reply in zip(idx, res):
                    out[i] = reply
        if any(isinstance(r, redis.ResponseError) for r in out):
            self._r._initialize = True    # e.g. MOVED: reload the slot map next call
            out = [None if isinstance(r, redis.ResponseError) else r for r in out]
        return out

    async def _raw_get_many(self, keys):
        return await self._per_node(keys, lambda c, ks, idx: c.pack_commands([("GET", k) for k in ks]))

    async def _raw_put_many(self, keys, frames):
        # hand-packed SETs: the pages go out without a joined copy
        replies = await self._per_node(
            keys, lambda c, ks, idx: _set_chunks(ks, [frames[i] for i in idx], self._ttl_ms))
        return [_ok(r) for r in replies]

    async def _raw_exists_many(self, keys):
        replies = await self._per_node(keys, lambda c, ks, idx: c.pack_commands([("EXISTS", k) for k in ks]))
        return [bool(r) for r in replies]

    async def _raw_delete_many(self, keys):
        replies = await self._per_node(keys, lambda c, ks, idx: c.pack_commands([("DEL", k) for k in ks]))
        return sum(r for r in replies if isinstance(r, int))

    async def _on_corrupt(self, keys):
        await self._raw_delete_many(keys)

    async def _close(self):
        await _aclose(self._r)
