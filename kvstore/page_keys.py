"""Page keys: chained digests that name a page of tokens by its whole prefix.

    key[-1] = namespace digest
    key[i]  = BLAKE2b-128(key = key[i-1], data = tokens[i*P:(i+1)*P] as little-endian int32)

Two requests share a page only when the namespace and every token up to the
end of that page are equal, so a hit on key[i] implies hits on key[0..i-1].
BLAKE2b (not Python's ``hash``, not a seeded hash) gives the same keys in every
process and on every machine, and a cryptographic digest keeps one tenant from
forging a collision with another's pages. Partial last pages get no key.
"""

from __future__ import annotations

import hashlib
import operator
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvstore.key_chain import load_key_chain
from kvstore.layout import KVLayout

KEY_BYTES = 16
PageKey = bytes
_TOKEN_DTYPE = np.dtype("<i4")
_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class KeyNamespace:
    """Everything besides the tokens that makes a page's KV differ."""

    model_id: str
    """Model name and revision; pages of different weights never mix."""
    layout: KVLayout
    """Shapes and dtype of the KV (the engine's arrangement does not matter)."""
    tp_rank: int = 0
    """Tensor-parallel rank whose heads this pool holds."""
    tp_size: int = 1
    """Tensor-parallel world size."""
    pp_rank: int = 0
    """Pipeline-parallel stage whose layers this pool holds (stages may have equal shapes)."""
    pp_size: int = 1
    """Pipeline-parallel world size; 1 leaves the digest as it was before stages existed."""
    lora_id: str | None = None
    """Adapter applied to the model, if any."""
    cache_salt: str | None = None
    """Per-tenant salt: requests with different salts never share pages."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("KeyNamespace.model_id must be a non-empty string")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(
                f"KeyNamespace.tp_rank must be in [0, tp_size), got rank {self.tp_rank} "
                f"of size {self.tp_size}"
            )
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(
                f"KeyNamespace.pp_rank must be in [0, pp_size), got stage {self.pp_rank} "
                f"of {self.pp_size}"
            )

    def digest(self) -> bytes:
        """The chain's seed: a digest of a canonical, unambiguous encoding of every field."""
        fields = (
            "kvstore-ns-v1",
            self.model_id,
            self.layout.fingerprint(),
            f"tp{self.tp_rank}/{self.tp_size}",
            # Only pipelines of several stages name theirs, so that keys of
            # single-stage engines stay those stored before the field existed.
            *((f"pp{self.pp_rank}/{self.pp_size}",) if self.pp_size > 1 else ()),
            "lora:" + (self.lora_id or ""),
            "salt:" + (self.cache_salt or ""),
        )
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        for f in fields:
            data = f.encode()
            h.update(len(data).to_bytes(4, "little"))
            h.update(data)
        return h.digest()


def tokens_to_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous little-endian int32 array; rejects ids that do not fit."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > _MAX_TOKEN_ID):
        raise ValueError(f"token ids must be in [0, 2**31), got range [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=_TOKEN_DTYPE)


def page_keys(
    namespace_digest: bytes,
    tokens: Sequence[int] | np.ndarray,
    page_size: int,
    prior_key: PageKey | None = None,
) -> list[PageKey]:
    """Keys of every full page of ``tokens``.

    ``prior_key`` continues a chain: pass the last key of the pages that come
    before ``tokens`` (then ``tokens`` must start on a page boundary).
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    return _chain(namespace_digest, tokens_to_array(tokens), page_size, prior_key)


def _chain(namespace_digest: bytes, tokens: np.ndarray, page_size: int,
           prior_key: PageKey | None) -> list[PageKey]:
    """page_keys over int32 tokens already checked: the C loop where built, else hashlib's."""
    num_pages = len(tokens) // page_size
    if not num_pages:
        return []
    prev = prior_key if prior_key is not None else namespace_digest
    data = tokens[: num_pages * page_size].tobytes()
    native = load_key_chain()
    if native is not None and len(prev) == KEY_BYTES:
        raw = native(prev, data, page_size * _TOKEN_DTYPE.itemsize, num_pages)
        return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]
    return hash_chain_reference(prev, data, page_size * _TOKEN_DTYPE.itemsize)


def hash_chain_reference(prev: bytes, data: bytes, page_bytes: int) -> list[PageKey]:
    """The chain through ``hashlib``: the definition the C loop is held to."""
    view = memoryview(data)
    blake = hashlib.blake2b
    keys: list[PageKey] = []
    append = keys.append
    for start in range(0, len(view) - page_bytes + 1, page_bytes):
        prev = blake(view[start : start + page_bytes], digest_size=KEY_BYTES, key=prev).digest()
        append(prev)
    return keys


class _Prompt:
    """A cached prompt: its full pages' tokens and their keys (never changed once made)."""

    __slots__ = ("digest", "tokens", "keys")

    def __init__(self, digest: bytes, tokens: np.ndarray, keys: list[PageKey]) -> None:
        self.digest, self.tokens, self.keys = digest, tokens, keys


class PageKeyCache:
    """``page_keys`` that hashes only the pages a recent prompt has not covered.

    An agent's next turn resends the previous prompt plus new tokens. The
    cache keeps the last ``max_prompts`` prompts (full pages only, at most
    ``max_pages`` pages in all) with their key chains; a new prompt is
    compared with each by one vectorised token compare, far cheaper than
    hashing, and the keys of the longest page-aligned common prefix are
    reused; only the pages after it are hashed, continuing that chain::

        cached   [p0 p1 p2 p3]            keys k0 k1 k2 k3
        new      [p0 p1 p2 p3 p4 p5]  ->  k0 k1 k2 k3 + hash(p4, p5 | k3)
        branch   [p0 p1 q2 q3]        ->  k0 k1     + hash(q2, q3 | k1)

    Keys equal ``page_keys(namespace_digest, tokens, page_size)`` always (a
    key depends on the namespace and every token up to its page's end, which
    the compare checks). Thread-safe; hashing runs outside the lock.
    """

    def __init__(self, page_size: int, max_prompts: int = 8, max_pages: int = 1 << 16) -> None:
        if page_size <= 0 or max_prompts <= 0 or max_pages <= 0:
            raise ValueError("PageKeyCache: page_size, max_prompts and max_pages must be positive")
        self.page_size, self.max_prompts, self.max_pages = page_size, max_prompts, max_pages
        self._prompts: list[_Prompt] = []  # most recently used last
        self._lock = threading.Lock()
        self.num_hashed_pages = 0
        """Pages hashed since creation (a next turn adds only its new pages)."""
        self.num_reused_pages = 0
        """Pages whose keys came from a cached prompt."""

    def keys(self, namespace_digest: bytes, tokens: Sequence[int] | np.ndarray) -> list[PageKey]:
        """Keys of every full page of ``tokens``, as :func:`page_keys` gives them."""
        P = self.page_size
        arr = tokens_to_array(tokens)
        num_pages = len(arr) // P
        with self._lock:
            base, num_same = self._longest_match(namespace_digest, arr[: num_pages * P])
        if base is not None and num_same == num_pages == len(base.keys):
            keys = list(base.keys)  # the same prompt again: nothing to hash
        else:
            prior = base.keys[num_same - 1] if num_same else None
            keys = (base.keys[:num_same] if num_same else []) + _chain(
                namespace_digest, arr[num_same * P : num_pages * P], P, prior)
        with self._lock:
            self.num_hashed_pages += num_pages - num_same
            self.num_reused_pages += num_same
            if base is not None and num_same == num_pages == len(base.keys):
                self._remember(base, base)  # the same prompt: only its recency changes
            elif num_pages:
                covered = base if base is not None and num_same == len(base.keys) else None
                # The cache keeps its own list: callers may change the one they get.
                self._remember(_Prompt(namespace_digest, arr[: num_pages * P].copy(), list(keys)), covered)
        return keys

    def _longest_match(self, digest: bytes, arr: np.ndarray) -> tuple[_Prompt | None, int]:
        """(cached prompt, pages) sharing the most leading full pages with ``arr``."""
        P = self.page_size
        best, best_pages = None, 0
        for prompt in reversed(self._prompts):  # most recent first: it wins ties
            n = min(len(prompt.tokens), len(arr))
            if prompt.digest != digest or n < P or prompt.tokens[0] != arr[0]:
                continue
            differ = np.flatnonzero(prompt.tokens[:n] != arr[:n])
            same = (int(differ[0]) if len(differ) else n) // P
            if same > best_pages:
                best, best_pages = prompt, same
        return best, best_pages

    def _remember(self, prompt: _Prompt, replaces: _Prompt | None) -> None:
        """Keep ``prompt`` as the most recent, in place of ``replaces`` (a prompt all of
        whose pages it holds: a next turn holds its previous one), and drop the oldest
        beyond the bounds."""
        prompts = self._prompts
        if replaces is not None and replaces in prompts:
            prompts.remove(replaces)
        prompts.append(prompt)
        total = sum(len(p.keys) for p in prompts)
        while prompts and (len(prompts) > self.max_prompts or total > self.max_pages):
            total -= len(prompts.pop(0).keys)


def num_matching(run: list[PageKey], p: int, keys: list[PageKey], i: int) -> int:
    """How many of ``keys[i:]`` are ``run[p]``, ``run[p + 1]``, ... in that order: a
    lookup's stretch through a run of chained pages (at least 1: ``keys[i]`` must be
    ``run[p]``). One C-level compare when the whole stretch matches."""
    m = min(len(run) - p, len(keys) - i)
    if m > 1 and run[p:p + m] != keys[i:i + m]:
        m = list(map(operator.ne, run[p:p + m], keys[i:i + m])).index(True)
    return m


def num_walked_back(run: list[PageKey], p: int, keys: list[PageKey], i: int) -> int:
    """How many of ``keys[i:]`` are ``run[p]``, ``run[p - 1]``, ... in that order: an
    eviction's victims peeling a run of chained pages from ``run[p]`` back (at least 1:
    ``keys[i]`` must be ``run[p]``). One C-level compare when the whole stretch matches."""
    m = min(p + 1, len(keys) - i)
    behind = run[p - m + 1:p + 1]
    behind.reverse()
    if behind == keys[i:i + m]:
        return m
    return list(map(operator.ne, behind, keys[i:i + m])).index(True)
