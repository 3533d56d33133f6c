"""The connector interface and the base class every L3 backend derives from.

The base class does once what every backend needs: key and value checks, the
value frame (header, checksum, codec; see codec.py), splitting a call into
sub-batches, timeouts, fail-fast after errors, and metrics. A backend
implements four raw batch methods over framed values and may override
`_close`, `_on_corrupt` and the error classes it raises. A backend that can
put a stored page straight into the caller's buffer (a local file) may also
implement `_raw_get_into_many`, which `get_into` then uses instead of
`_raw_get_many` + decode.

Threading: a connector belongs to the asyncio event loop that first uses it
and is not thread-safe; large encodes/decodes run on a small worker pool
owned by the connector so the loop is not blocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from connectors import codec as _codec

log = logging.getLogger(__name__)

# Batches with fewer compressed bytes than this are encoded/decoded on the loop
# thread: a hop to a worker costs more than coding a few hundred KB. Codec
# "none" costs a hash at ~50 GB/s and a memcpy, so it always runs inline.
_INLINE_CODEC_BYTES = 1 << 20
_VERSION_BYTE, _CODEC_BYTE = 4, 5   # offsets of the format version and codec id in a frame header
_MAX_KEY_LEN = 512


class ConnectorError(ValueError):
    """A connector was misused or misconfigured; the message says how to fix it.

    Store faults (server down, corrupt value, timeout) never raise: they are
    misses / False results, counted in `ConnectorStats`.
    """


@dataclass
class ConnectorStats:
    """Counters since the connector was opened (a snapshot; safe to keep).

    Keys: `hits + misses` = keys asked for by get/get_into. Every miss is
    counted once in `misses`; `corrupt`, `wrong_fingerprint`, `wrong_key` (a
    valid value stored under another key than it was written for) and
    `wrong_size` (a get_into buffer of another length than the stored page) and
    `wrong_encoding` (a valid value of another encoding, e.g. fp8 for a lossless
    reader) say why some of them missed; corrupt and wrong-key values are dropped from
    the store (no reader can use them). Operations: `errors` and `timeouts` count failed raw batch
    calls (each failing every key of its sub-batch), including calls refused
    fast while the store is in its error back-off.
    Bytes: `bytes_in/out` are framed bytes moved from/to the store,
    `raw_bytes_in/out` the page bytes returned to / accepted from callers.
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    wrong_fingerprint: int = 0
    wrong_key: int = 0
    wrong_size: int = 0
    wrong_encoding: int = 0
    puts: int = 0
    put_failures: int = 0
    deletes: int = 0
    errors: int = 0
    timeouts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    raw_bytes_in: int = 0
    raw_bytes_out: int = 0


class Connector(ABC):
    """An L3 store of whole pages under page keys.

    All methods are coroutines run on one event loop. Keys are non-empty bytes
    (16-byte page keys in kvstore). Values are whole pages; a store may drop any
    value at any time (eviction, TTL, restart), so every read can miss.

    Common options (every backend):
      fingerprint: layout fingerprint written into each value; a value with
          another fingerprint reads as a miss.
      codec: "none", "lz4", "shuffle_lz4", "zstd" or "shuffle_zstd";
          the default is the backend's `default_codec`.
      elem_size: dtype width for the shuffling codecs (2 for bf16/fp16).
      encoding: "lossless" (the default) or "fp8_e4m3": pages stored as fp8 with a
          power-of-two scale per group, about half the bytes, and LOSSY (fp8.py);
          bf16 pages, codec none. Reads take only values of this encoding.
      encoding_group_elems: elements per scale group of an fp8 page (even; 0: the
          whole page is one group).
      timeout_s: limit on each raw batch call (sub-batch); past it the call
          is a miss. Default: the backend's `default_timeout_s`.
      max_batch_keys / max_batch_bytes: a call is split into sub-batches of at
          most this many keys / framed bytes (puts); up to `max_inflight` run
          at once (defaults: the backend's `default_*` attributes).
      max_value_bytes: largest page accepted or decoded (guards the decoder).
      error_backoff_s: after a store error, calls fail fast for this long
          instead of waiting on a dead server again.
      codec_threads: worker threads for large encodes/decodes.
    """

    default_codec = "none"
    default_max_batch_keys = 64
    default_max_batch_bytes = 256 << 20
    default_timeout_s = 5.0
    default_max_inflight = 4
    #: errors a raw call may raise that mean "the store failed", not "bug".
    transient_errors: tuple[type[BaseException], ...] = (OSError, ConnectionError)
    timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)

    def __init__(self, *, fingerprint: str = "", codec: str | None = None,
                 elem_size: int = 2, encoding: str = "lossless", encoding_group_elems: int = 0,
                 timeout_s: float | None = None,
                 max_batch_keys: int | None = None, max_batch_bytes: int | None = None,
                 max_inflight: int | None = None, max_value_bytes: int = 1 << 30,
                 error_backoff_s: float = 0.2, codec_threads: int | None = None) -> None:
        try:
            self._encoding = _codec.encoding_id(encoding)
        except ValueError as exc:
            raise ConnectorError(str(exc)) from None
        is_encoded = self._encoding != _codec.LOSSLESS
        # an encoded page is stored uncompressed: fp8 bytes gain little from a compressor
        name = codec if codec is not None else ("none" if is_encoded else self.default_codec)
        try:
            self._codec_id = _codec.codec_id(name)
        except ValueError as exc:
            raise ConnectorError(str(exc)) from None
        _require(not is_encoded or name == "none",
                 f"encoding {encoding!r} stores pages with codec none; drop codec={name!r}")
        _require(not is_encoded or (elem_size == 2 and encoding_group_elems >= 0
                                    and encoding_group_elems % 2 == 0),
                 f"encoding {encoding!r} takes bf16 pages (elem_size 2) and an even "
                 f"encoding_group_elems >= 0, got {elem_size} and {encoding_group_elems}")
        self.encoding = encoding
        self._group_elems = encoding_group_elems
        _require(isinstance(fingerprint, str), "fingerprint must be a str")
        _require(1 <= elem_size <= 255, f"elem_size must be 1..255, got {elem_size}")
        timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        _require(timeout_s > 0, f"timeout_s must be > 0, got {timeout_s}")
        max_inflight = max_inflight or self.default_max_inflight
        _require((max_batch_bytes is None or max_batch_bytes > 0) and max_inflight > 0
                 and max_value_bytes > 0,
                 "max_batch_bytes, max_inflight and max_value_bytes must be > 0")
        _require(error_backoff_s >= 0, "error_backoff_s must be >= 0")
        self.codec = name
        self.fingerprint = fingerprint
        self._fp = _codec.fingerprint_digest(fingerprint)
        self._elem_size = elem_size
        self.timeout_s = float(timeout_s)
        self._max_keys = max_batch_keys or self.default_max_batch_keys
        _require(self._max_keys > 0, "max_batch_keys must be > 0")
        self._max_bytes = max_batch_bytes or self.default_max_batch_bytes
        self._max_inflight = max_inflight
        self._max_value = max_value_bytes
        self._backoff_s = error_backoff_s
        self._down_until = 0.0
        self._codec_threads = codec_threads or min(4, os.cpu_count() or 1)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stats = ConnectorStats()
        self._closed = False

    # ------------------------------------------------------------ raw methods
    @abstractmethod
    async def _raw_get_many(self, keys: list[bytes]) -> list[Any]:
        """Framed values for keys, None where absent. Changes nothing stored
        (a backend may refresh recency). Raises a `transient_errors` type on
        store failure."""

    @abstractmethod
    async def _raw_put_many(self, keys: list[bytes], frames: list[_codec.Frame]) -> list[bool]:
        """Store framed values (head + payload, see codec.Frame); True where the
        store now holds this frame. Must not keep a reference to a payload
        after returning (it may be the caller's buffer): copy or send it."""

    @abstractmethod
    async def _raw_exists_many(self, keys: list[bytes]) -> list[bool]:
        """Presence of each key; does not read or check values."""

    @abstractmethod
    async def _raw_delete_many(self, keys: list[bytes]) -> int:
        """Remove keys; the number that were present."""

    # Optional: a backend that overrides this gets it called by get_into.
    async def _raw_get_into_many(self, keys: list[bytes], views: list[memoryview]) -> ReadInto:
        """Read each key's frame and decode it into its view (writable bytes,
        the caller's page length), checked as `codec.decode_into` checks
        (`codec.decode_parts_into` takes a payload read straight into the view).

        Returns one status per key (see `ReadInto`) and counts nothing: the
        base class does. A view whose status is not "hit" is unspecified.
        Once this returns, raises or is cancelled, nothing writes into the
        views: run file or decode work with `_run_in_pool`, which waits for
        it. Changes nothing stored (may refresh recency). Raises a
        `transient_errors` type on store failure (the sub-batch then misses).
        """
        raise NotImplementedError

    async def _close(self) -> None:
        """Release backend resources (connections, processes); idempotent."""

    async def _on_corrupt(self, keys: list[bytes]) -> None:
        """Called with keys whose stored value failed its checks; backends
        that can should drop them so the space is reclaimed. Default: keep."""

    # ------------------------------------------------------------ public API
    async def exists(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present (stops at the first absent one).

        A hint only: a present value may still miss on get (corrupt, other
        fingerprint, evicted meanwhile). Store failure counts as absent.
        """
        keys = self._checked_keys(keys)
        num = 0
        for lo in range(0, len(keys), self._max_keys):
            found = await self._call(self._raw_exists_many, keys[lo:lo + self._max_keys])
            if found is None:
                return num
            for present in found:
                if not present:
                    return num
                num += 1
        return num

    async def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Pages for keys; None = miss (absent, corrupt, timeout, other fingerprint)."""
        keys = self._checked_keys(keys)
        out: list[bytes | None] = [None] * len(keys)

        def decode(i: int, frame) -> None:
            out[i] = _codec.decode(frame, self._fp, self._max_value, keys[i], self._encoding)

        await self._fetch(keys, decode)
        found = [v for v in out if v is not None]
        self._count_reads(len(keys), len(found), sum(len(v) for v in found))
        return out

    async def get_into(self, keys: Sequence[bytes], buffers: Sequence[memoryview]) -> list[bool]:
        """Decode each found page straight into its buffer (writable, exactly the
        page length). False = miss; that buffer's contents are then unspecified.
        Once this returns, raises or is cancelled, nothing writes into the buffers.
        """
        keys = self._checked_keys(keys)
        if len(buffers) != len(keys):
            raise ConnectorError(f"get_into got {len(keys)} keys but {len(buffers)} buffers")
        views = [_writable_view(b) for b in buffers]
        if type(self)._raw_get_into_many is not Connector._raw_get_into_many:
            ok = await self._fetch_into(keys, views)
        else:
            ok = [False] * len(keys)

            def decode(i: int, frame) -> None:
                _codec.decode_into(frame, views[i], self._fp, self._max_value, keys[i], self._encoding)
                ok[i] = True

            await self._fetch(keys, decode)
        self._count_reads(len(keys), sum(ok), sum(len(v) for v, hit in zip(views, ok) if hit))
        return ok

    async def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> list[bool]:
        """Store pages; True = stored and readable once this returns.

        A store may refuse (full, down, value too large): False, counted.
        Concurrent puts of one key leave one of the values, whole.
        """
        keys = self._checked_keys(keys)
        if len(values) != len(keys):
            raise ConnectorError(f"put got {len(keys)} keys but {len(values)} values")
        raws = [_readable_view(v, self._max_value) for v in values]
        is_light = self._codec_id == _codec.CODECS["none"] and self._encoding == _codec.LOSSLESS
        frames = await self._run_coding([lambda r=r, k=k: self._encode(r, k) for r, k in zip(raws, keys)],
                                        0 if is_light else sum(len(r) for r in raws))
        todo = [i for i, f in enumerate(frames) if f is not None]   # None: a page the encoding cannot carry
        stored = await self._put_frames([keys[i] for i in todo], [frames[i] for i in todo])
        result = [False] * len(keys)
        for i, ok in zip(todo, stored):
            result[i] = ok
            if ok:
                self._stats.puts += 1
                self._stats.raw_bytes_out += len(raws[i])
                self._stats.bytes_out += len(frames[i])
        self._stats.put_failures += result.count(False)
        return result

    async def _put_frames(self, keys: list[bytes], frames: list[_codec.Frame]) -> list[bool]:
        """Raw-put frames in sub-batches; True where stored."""
        result = [False] * len(keys)

        async def one(lo: int, hi: int) -> None:
            stored = await self._call(self._raw_put_many, keys[lo:hi], frames[lo:hi])
            if stored is not None and _length(stored) != hi - lo:   # a backend bug
                self._stats.errors += 1
                log.warning("%s: _raw_put_many returned %s results for %d keys; all failed",
                            type(self).__name__, _length(stored), hi - lo)
            elif stored is not None:
                result[lo:hi] = [bool(s) for s in stored]

        if keys:
            await run_ranges(split_ranges([len(f) for f in frames], self._max_keys, self._max_bytes),
                             one, self._max_inflight)
        return result

    def _encode(self, raw: memoryview, key: bytes) -> _codec.Frame | None:
        """The frame of one page; None for a page the encoding cannot carry (fp8: NaN/inf)."""
        try:
            return _codec.encode(raw, self._codec_id, self._fp, self._elem_size, key=key,
                                 encoding=self._encoding, group_elems=self._group_elems)
        except ValueError as exc:   # fp8.UnencodablePage, or a page that is not whole groups
            if self._encoding == _codec.LOSSLESS:
                raise
            log.warning("%s: page not stored as %s: %s", type(self).__name__, self.encoding, exc)
            return None

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys; the number that were present. Failure counts as 0."""
        keys = self._checked_keys(keys)
        num = 0
        for lo in range(0, len(keys), self._max_keys):
            got = await self._call(self._raw_delete_many, keys[lo:lo + self._max_keys])
            num += got or 0
        self._stats.deletes += num
        return num

    async def close(self) -> None:
        """Release everything; idempotent. Later calls raise ConnectorError."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._close()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def stats(self) -> ConnectorStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    async def __aenter__(self) -> "Connector":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------ internals
    async def _fetch(self, keys: list[bytes], decode: Callable[[int, Any], None]) -> None:
        """Raw-get keys in sub-batches and run decode(i, frame) for each found
        frame; a frame that fails its checks is counted and left as a miss."""
        async def one(lo: int, hi: int) -> None:
            frames = await self._call(self._raw_get_many, keys[lo:hi])
            if frames is None:
                return
            if _length(frames) != hi - lo:   # a backend bug: no frame can be matched to its key
                self._stats.errors += 1
                log.warning("%s: _raw_get_many returned %s values for %d keys; all missed",
                            type(self).__name__, _length(frames), hi - lo)
                return
            jobs, found, sizes, statuses = [], [], 0, {}
            for i, frame in enumerate(frames, start=lo):
                if frame is None:
                    continue
                try:
                    n = len(frame)
                    heavy = n > _CODEC_BYTE and (frame[_CODEC_BYTE] != _codec.CODECS["none"]
                                                 or frame[_VERSION_BYTE] == _codec.ENCODED_FORMAT_VERSION)
                except Exception:   # not bytes-like: a corrupt value
                    log.warning("%s: corrupt value dropped: %s value", type(self).__name__,
                                type(frame).__name__)
                    statuses[i] = "corrupt"
                    continue
                jobs.append(self._guarded(decode, i, frame))
                found.append(i)
                if heavy:
                    sizes += n
                self._stats.bytes_in += n
            statuses.update(zip(found, await self._run_coding(jobs, sizes)))
            await self._count_failures(keys, statuses)

        await run_ranges(self._key_ranges(len(keys)), one, self._max_inflight)

    async def _fetch_into(self, keys: list[bytes], views: list[memoryview]) -> list[bool]:
        """get_into through the backend's `_raw_get_into_many`, in sub-batches;
        True where the view now holds the checked page."""
        ok = [False] * len(keys)

        async def one(lo: int, hi: int) -> None:
            got = await self._call(self._raw_get_into_many, keys[lo:hi], views[lo:hi])
            if got is None:
                return
            if _length(got.statuses) != hi - lo:   # a backend bug: no status can be matched to its key
                self._stats.errors += 1
                log.warning("%s: _raw_get_into_many returned %s statuses for %d keys; all missed",
                            type(self).__name__, _length(got.statuses), hi - lo)
                return
            self._stats.bytes_in += got.num_bytes
            failed = {}
            for i, status in enumerate(got.statuses, start=lo):
                if status == "hit":
                    ok[i] = True
                elif status != "absent":
                    failed[i] = status
            await self._count_failures(keys, failed)

        await run_ranges(self._key_ranges(len(keys)), one, self._max_inflight)
        return ok

    def _key_ranges(self, num_keys: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + self._max_keys, num_keys)) for lo in range(0, num_keys, self._max_keys)]

    async def _count_failures(self, keys: list[bytes], statuses: dict[int, str | None]) -> None:
        """Count the keys whose value failed its checks (key index -> status of
        `frame_status`; None = a hit) and drop the unusable ones from the store."""
        failed = []
        for i, status in sorted(statuses.items()):
            if status == "corrupt":
                self._stats.corrupt += 1
                failed.append(keys[i])
            elif status == "key":
                self._stats.wrong_key += 1
                failed.append(keys[i])
            elif status == "fingerprint":
                self._stats.wrong_fingerprint += 1
            elif status == "size":
                self._stats.wrong_size += 1
            elif status == "encoding":
                self._stats.wrong_encoding += 1
        if failed:
            await self._call(self._on_corrupt_wrapper, failed)

    def _guarded(self, decode: Callable[[int, Any], None], i: int, frame) -> Callable[[], str | None]:
        """A job that decodes one frame: None, or its `frame_status`
        (any exception is a corrupt value: a store fault never raises).
        (Runs on worker threads: it reports, the loop thread counts.)"""
        def job() -> str | None:
            try:
                decode(i, frame)
            except Exception as exc:
                return frame_status(exc, type(self).__name__)
            return None
        return job

    async def _on_corrupt_wrapper(self, keys: list[bytes]) -> bool:
        await self._on_corrupt(keys)
        return True

    def _count_reads(self, num_keys: int, num_hits: int, raw_bytes: int) -> None:
        self._stats.hits += num_hits
        self._stats.misses += num_keys - num_hits
        self._stats.raw_bytes_in += raw_bytes

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args) -> Any:
        """Run one raw batch call under the timeout; None when the store failed."""
        if self._closed:
            raise ConnectorError("connector is closed; open a new one")
        if time.monotonic() < self._down_until:
            self._stats.errors += 1
            return None
        try:
            return await asyncio.wait_for(fn(*args), self.timeout_s)
        except self.timeout_errors as exc:
            self._stats.timeouts += 1
            self._fail(fn, exc)
        except self.transient_errors as exc:
            self._stats.errors += 1
            self._fail(fn, exc)
        return None

    def _fail(self, fn: Callable, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._backoff_s
        log.warning("%s.%s failed (%s: %s); failing fast for %.2fs",
                    type(self).__name__, getattr(fn, "__name__", fn),
                    type(exc).__name__, exc, self._backoff_s)

    def _checked_keys(self, keys: Sequence[bytes]) -> list[bytes]:
        if self._closed:
            raise ConnectorError("connector is closed; open a new one")
        out = list(keys)
        for k in out:
            if not isinstance(k, bytes) or not 0 < len(k) <= _MAX_KEY_LEN:
                raise ConnectorError(
                    f"keys must be non-empty bytes of at most {_MAX_KEY_LEN} bytes, got {k!r:.60}")
        return out

    async def _run_coding(self, jobs: list[Callable[[], Any]], num_bytes: int) -> list[Any]:
        """Run encode/decode jobs; on worker threads when the batch is large.

        Even if the caller is cancelled, this waits for started jobs to finish,
        so no worker writes into a caller's buffer after the call is over.
        """
        if num_bytes < _INLINE_CODEC_BYTES or len(jobs) == 0:
            return [job() for job in jobs]
        return await self._run_in_pool(*jobs)

    async def _run_in_pool(self, *jobs: Callable[[], Any]) -> list[Any]:
        """Run jobs on the connector's worker threads; their results in order.

        Even if the caller is cancelled (or a job raises), this waits for every
        started job to finish, so no worker writes into a caller's buffer after
        the call is over.
        """
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._codec_threads, thread_name_prefix="l3-codec")
        loop = asyncio.get_running_loop()
        futs = [loop.run_in_executor(self._pool, job) for job in jobs]
        try:
            return list(await asyncio.shield(asyncio.gather(*futs)))
        except BaseException:   # cancelled, or a job raised while others still run
            await _wait_all(futs)
            raise


@dataclass(slots=True)
class ReadInto:
    """What `_raw_get_into_many` did, per key in order: "hit" (the view holds
    the checked page), "absent", or why the stored value missed, as
    `frame_status` names it; and `num_bytes`, framed bytes read from the store."""

    statuses: list[str]
    num_bytes: int


def frame_status(exc: Exception, owner: str) -> str:
    """The miss status of a value whose check or decode raised `exc`:
    "fingerprint", "encoding", "key", "size" or "corrupt" (any other exception: a
    store fault never raises). Logs the ones worth a warning."""
    if isinstance(exc, _codec.FingerprintMismatch):
        return "fingerprint"
    if isinstance(exc, _codec.EncodingMismatch):
        return "encoding"
    if isinstance(exc, _codec.KeyMismatch):
        log.warning("%s: value stored under the wrong key dropped", owner)
        return "key"
    if isinstance(exc, _codec.SizeMismatch):
        log.warning("%s: get_into buffer does not fit: %s", owner, exc)
        return "size"
    log.warning("%s: corrupt value dropped: %s: %s", owner, type(exc).__name__, exc)
    return "corrupt"


def split_ranges(sizes: list[int], max_keys: int, max_bytes: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most max_keys items and max_bytes bytes
    (an item larger than max_bytes gets a range of its own)."""
    ranges, lo, size = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and (i - lo >= max_keys or size + n > max_bytes):
            ranges.append((lo, i))
            lo, size = i, 0
        size += n
    if lo < len(sizes):
        ranges.append((lo, len(sizes)))
    return ranges


async def run_ranges(ranges: list[tuple[int, int]], one: Callable[[int, int], Awaitable[None]],
                     max_inflight: int) -> None:
    """Run one(lo, hi) for each range, at most max_inflight at once."""
    if len(ranges) == 1:
        await one(*ranges[0])
        return
    sem = asyncio.Semaphore(max_inflight)

    async def limited(lo: int, hi: int) -> None:
        async with sem:
            await one(lo, hi)

    await asyncio.gather(*(limited(lo, hi) for lo, hi in ranges))


async def _wait_all(futs: list[asyncio.Future]) -> None:
    """Wait until every future is done, even through repeated cancellation
    (which is re-raised afterwards)."""
    cancelled = False
    while True:
        try:
            await asyncio.wait(futs)
            break
        except asyncio.CancelledError:
            cancelled = True
    for f in futs:   # mark failures retrieved; the caller raises its own
        if not f.cancelled():
            f.exception()
    if cancelled:
        raise asyncio.CancelledError


def _length(values: Any) -> int | None:
    try:
        return len(values)
    except Exception:
        return None


def _readable_view(value: Any, max_value: int) -> memoryview:
    try:
        view = memoryview(value)
    except TypeError:
        raise ConnectorError(
            f"values must be bytes-like (bytes, bytearray, memoryview), got {type(value).__name__}") from None
    if not view.c_contiguous:
        raise ConnectorError("values must be C-contiguous buffers")
    view = view.cast("B")
    if len(view) > max_value:
        raise ConnectorError(
            f"value of {len(view)} bytes exceeds max_value_bytes={max_value}; raise the option")
    return view


def _writable_view(buf: Any) -> memoryview:
    try:
        view = memoryview(buf)
    except TypeError:
        raise ConnectorError(f"buffers must be writable memoryviews, got {type(buf).__name__}") from None
    if view.readonly or not view.c_contiguous:
        raise ConnectorError("get_into buffers must be writable and C-contiguous")
    return view.cast("B")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConnectorError(message)
