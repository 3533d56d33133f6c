"""Request traces for hit-rate replay: loading, and the two file formats we read.

A trace is a list of :class:`TraceRequest` in arrival order; each carries the
page keys of its prompt's full pages, so the replay sees exactly what the
service's index would see.

Formats (both JSON Lines, one request per line, blank lines ignored):

**mooncake** -- the format of Mooncake's published traces (FAST'25)::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}

``hash_ids`` holds one id per 512-token block; equal ids mean an equal prefix
up to and including that block. The page key of id ``i`` is ``i`` as 16
little-endian bytes (:func:`block_id_key`), so keys are deterministic and
prefix identity is the trace's own.

**tokens** -- our token-level format, for traces captured from an engine::

    {"timestamp": 12.5, "tokens": [1, 15043, 3186, ...], "namespace": "llama-3-8b"}

``timestamp`` (ms, optional, defaults to the line number) and ``tokens``
(token ids, ints in [0, 2**31)) are required/used; ``namespace`` (optional
string, default ``"default"``) separates requests that must never share
pages (other model, adapter or tenant salt). Keys are the service's own
chained page keys (:func:`kvstore.page_keys.page_keys`) over full pages of
``page_size`` tokens; a partial last page gets no key, as in the service.
Other fields are ignored.

``load_trace(path)`` picks the format from the first record (``hash_ids`` ->
mooncake, ``tokens`` -> tokens) unless told.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kvstore.page_keys import KEY_BYTES, PageKey, page_keys

MOONCAKE_BLOCK_TOKENS = 512
TRACE_FORMATS = ("auto", "mooncake", "tokens")


class TraceFormatError(ValueError):
    """A trace line is not valid in its format; the message names the line and the fix."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrived and the keys of its full prompt pages."""

    timestamp: float
    """Arrival time in ms from the start of the trace."""
    keys: tuple[PageKey, ...]
    """Page keys of the prompt's full pages, in order (a chain)."""


@dataclass(frozen=True)
class Trace:
    """A named list of requests in arrival order."""

    name: str
    requests: list[TraceRequest]

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def num_blocks(self) -> int:
        """All block references (pages over all requests, repeats counted)."""
        return sum(len(r.keys) for r in self.requests)

    @property
    def num_distinct_blocks(self) -> int:
        return len({k for r in self.requests for k in r.keys})


def block_id_key(block_id: int) -> PageKey:
    """The 16-byte page key of a Mooncake block id (little-endian, zero-padded)."""
    if not 0 <= block_id < 2 ** (8 * KEY_BYTES):
        raise TraceFormatError(f"hash_ids must be ints in [0, 2**{8 * KEY_BYTES}), got {block_id}")
    return block_id.to_bytes(KEY_BYTES, "little")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{path}:{line_no}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise TraceFormatError(f"{path}:{line_no}: expected a JSON object per line")
            yield line_no, record


def _timestamp(record: dict, where: str, default: float) -> float:
    ts = record.get("timestamp", default)
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts < math.inf:
        raise TraceFormatError(f"{where}: 'timestamp' must be a finite number of ms >= 0, got {ts!r}")
    return float(ts)


def _check_lengths(record: dict, where: str) -> None:
    """Mooncake's optional token counts: ints >= 0 when present."""
    for name in ("input_length", "output_length"):
        n = record.get(name)
        if n is not None and (type(n) is not int or n < 0):
            raise TraceFormatError(f"{where}: '{name}' must be an int >= 0, got {n!r}")


def mooncake_requests(records: Iterable[tuple[int, dict]], where: str) -> list[TraceRequest]:
    """Requests from Mooncake records (``hash_ids`` per 512-token block)."""
    requests = []
    cache: dict[int, PageKey] = {}  # share one bytes object per id: less memory, faster dicts
    for line_no, record in records:
        ids = record.get("hash_ids")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise TraceFormatError(f"{where}:{line_no}: 'hash_ids' must be a list of ints")
        _check_lengths(record, f"{where}:{line_no}")
        keys = []
        for i in ids:
            key = cache.get(i)
            if key is None:
                try:
                    key = cache[i] = block_id_key(i)
                except TraceFormatError as e:
                    raise TraceFormatError(f"{where}:{line_no}: {e}") from None
            keys.append(key)
        requests.append(TraceRequest(_timestamp(record, f"{where}:{line_no}", line_no), tuple(keys)))
    return requests


def _namespace_digest(name: str) -> bytes:
    return hashlib.blake2b(b"kvstore-trace-ns-v1:" + name.encode(), digest_size=KEY_BYTES).digest()


def token_requests(
    records: Iterable[tuple[int, dict]], where: str, page_size: int
) -> list[TraceRequest]:
    """Requests from token-level records, keyed with the service's chained page keys."""
    if page_size <= 0:
        raise ValueError(f"page_size must be a positive number of tokens, got {page_size}")
    requests = []
    digests: dict[str, bytes] = {}
    for line_no, record in records:
        tokens = record.get("tokens")
        if not isinstance(tokens, list):
            raise TraceFormatError(f"{where}:{line_no}: 'tokens' must be a list of token ids")
        ns = record.get("namespace", "default")
        if not isinstance(ns, str):
            raise TraceFormatError(f"{where}:{line_no}: 'namespace' must be a string")
        digest = digests.get(ns) or digests.setdefault(ns, _namespace_digest(ns))
        try:
            keys = page_keys(digest, tokens, page_size)
        except ValueError as e:
            raise TraceFormatError(f"{where}:{line_no}: {e}") from None
        requests.append(TraceRequest(_timestamp(record, f"{where}:{line_no}", line_no), tuple(keys)))
    return requests


def detect_format(path: Path) -> str:
    """'mooncake' or 'tokens', from the first record of the file."""
    for line_no, record in _records(path):
        if "hash_ids" in record:
            return "mooncake"
        if "tokens" in record:
            return "tokens"
        raise TraceFormatError(
            f"{path}:{line_no}: neither 'hash_ids' (mooncake) nor 'tokens' found; "
            "pass the format explicitly or fix the trace"
        )
    raise TraceFormatError(f"{path}: the trace is empty")


def load_trace(
    path: str | Path,
    fmt: str = "auto",
    page_size: int = MOONCAKE_BLOCK_TOKENS,
    max_requests: int | None = None,
) -> Trace:
    """Read a trace file. ``page_size`` applies to the tokens format only."""
    path = Path(path)
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {TRACE_FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    records: Iterable[tuple[int, dict]] = _records(path)
    if max_requests is not None:
        records = (r for i, r in zip(range(max_requests), records))
    if fmt == "mooncake":
        requests = mooncake_requests(records, str(path))
    else:
        requests = token_requests(records, str(path), page_size)
    return Trace(path.name, requests)


def trace_from_block_ids(name: str, requests: Iterable[Iterable[int]]) -> Trace:
    """A trace from lists of block ids (Mooncake semantics); for tests and generators."""
    records = ((i, {"hash_ids": list(ids), "timestamp": i}) for i, ids in enumerate(requests))
    return Trace(name, mooncake_requests(records, name))
