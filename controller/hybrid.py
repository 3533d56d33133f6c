"""The hit rule of hybrid models (SSD / linear-attention and sliding-window layers next to
full attention), over two ordinary cache clients:

- ``pages``: the full-attention layers' KV pages, keyed by the token chain as for any model;
- ``snapshots``: state snapshots, one per "page" of their own layout (decoder/hybrid_state.py).
  The snapshot after page i is cached under the tokens ``key_tokens(page_key[i])``: the
  16-byte page key read as 8 uint16 ids, so the snapshot's own key is
  BLAKE2b(snapshot namespace digest, page_key[i]): chained to the prefix (it names the
  same tokens), in the model's namespace (model id + the snapshot layout) and checked by
  L3's frame like any page (key, layout, size, checksum).

The hit rule (``HybridCache.lookup``): the hit is the longest prefix of B whole pages with

    B * page_size <= len(tokens) - 1          (the engine always computes the last token)
    pages 0 .. B-1 present                    (full attention reads every position)
    a snapshot after page B-1 present          (SSD states + the last window of every
                                                sliding-window layer, at exactly B)

Snapshots are looked for at the end of the page hit (a prompt's end), at that end rounded
down to ``align_pages`` (a branch snapshot), then at each stride multiple below it (at most
``max_probes`` lookups). A prefix with pages but no snapshot at its end is no
hit past the last snapshot before it; a snapshot whose pages are missing is never reached.

Stores are all-or-nothing across the groups: pages first; snapshots only if every page was
placed (a snapshot is useful only with all pages before it, and ``StoreResult`` does not
say which ones were skipped); a snapshot that fails to store leaves its pages, which are
then no hit past the previous snapshot (the read rule above), never a wrong one.

Stride (``snapshot_ends``, ``branch_snapshot``): snapshots are stored after every
``stride_pages`` pages, at branch points (where a request's page hit ran past its snapshot)
and at the end of every stored prompt, twice: after its last full page (a continuation of the
conversation hits there) and after page ceil(n/P) - 1 of an n-token prompt (the same
prompt resent hits there: at most n - 1 tokens). ``default_stride_pages`` sizes the
stride so that snapshots add at most a quarter to a prefix's bytes.

The snapshot client's lookups must wait for L3 (``SNAPSHOT_PREFETCH``: wait_complete): a
snapshot is one 8-"token" page that stands for the whole prefix, so the ``auto`` cost
model, which weighs a page's load against recomputing its tokens, would misjudge it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from controller.api import CacheClient, CacheError, LoadHandle, LookupResult
from controller.arguments import token_array
from controller.config import ControllerConfig, PrefetchConfig
from kvstore.page_keys import KEY_BYTES, PageKey, page_keys

log = logging.getLogger(__name__)

SNAPSHOT_PREFETCH = PrefetchConfig(policy="wait_complete")
"""The prefetch policy of a snapshot client (embedded: ``snapshot_config``; daemon client:
its ``prefetch`` option)."""

SNAPSHOT_BYTES_SHARE = 0.25
"""Snapshots at stride multiples add at most this share to the bytes of a cached prefix."""


def key_tokens(page_key: PageKey) -> np.ndarray:
    """The snapshot after a page is cached under this page key read as 8 uint16 token ids."""
    if len(page_key) != KEY_BYTES:
        raise CacheError(f"a page key has {KEY_BYTES} bytes, got {len(page_key)}")
    return np.frombuffer(page_key, dtype="<u2").astype(np.int64)


def snapshot_config(config: ControllerConfig) -> ControllerConfig:
    """``config`` for the embedded snapshot client: lookups wait for L3 (module doc)."""
    return dataclasses.replace(config, prefetch=SNAPSHOT_PREFETCH)


def default_stride_pages(snapshot_bytes: int, page_bytes: int, align_pages: int = 1) -> int:
    """Pages between snapshots such that snapshot bytes <= SNAPSHOT_BYTES_SHARE of the page
    bytes they serve, rounded up to a multiple of ``align_pages`` (the model's scan block,
    where states exist without cutting the prefill)."""
    pages = max(1, math.ceil(snapshot_bytes / (SNAPSHOT_BYTES_SHARE * page_bytes)))
    return math.ceil(pages / align_pages) * align_pages


@dataclass(frozen=True)
class HybridHit:
    """A hybrid lookup: ``num_pages`` pages (leased in ``pages``) and the snapshot after them
    (leased in ``snapshot``; None when num_pages is 0)."""

    pages: LookupResult
    snapshot: LookupResult | None
    num_pages: int
    num_probes: int = 0
    """Snapshot lookups this hit took."""
    num_page_hits: int = 0
    """Pages the page cache held for these tokens (within the n-1 cap) when looked up: more
    than ``num_pages`` where another prompt branched off after the last snapshot: a place
    worth a snapshot of its own (``branch_snapshot``)."""

    @property
    def snapshot_from_l3(self) -> bool:
        return self.snapshot is not None and self.snapshot.num_l3_pages > 0


@dataclass(frozen=True)
class HybridStoreResult:
    num_pages: int
    num_new_pages: int
    num_snapshots: int
    """Snapshots handed to the snapshot cache (new or already there)."""
    num_skipped: int = 0
    """Pages or snapshots that could not be placed (host pool full of leased entries)."""


class HybridCache:
    """Pages + snapshots of one hybrid model behind the hit rule (module doc)."""

    def __init__(self, pages: CacheClient, snapshots: CacheClient, page_namespace_digest: bytes,
                 stride_pages: int, max_probes: int = 4, align_pages: int = 1) -> None:
        """``align_pages``: snapshots other than a prompt's end sit on multiples of it (the
        model's scan block in pages, where states exist without cutting the prefill); the
        stride must be one of them."""
        if snapshots.layout.page_size != KEY_BYTES // 2:
            raise CacheError(f"the snapshot cache's layout must hold {KEY_BYTES // 2} tokens per page "
                             f"(one key), got {snapshots.layout.page_size}")
        if not isinstance(stride_pages, int) or stride_pages < 1:
            raise CacheError(f"stride_pages must be an int >= 1, got {stride_pages!r}")
        if not isinstance(align_pages, int) or align_pages < 1 or stride_pages % align_pages:
            raise CacheError(f"align_pages must be an int >= 1 dividing stride_pages "
                             f"({stride_pages}), got {align_pages!r}")
        self.align_pages = align_pages
        self.pages, self.snapshots = pages, snapshots
        self.page_size = pages.layout.page_size
        self.stride_pages, self.max_probes = stride_pages, max_probes
        self._digest = page_namespace_digest

    def snapshot_ends(self, prompt_len: int) -> list[int]:
        """Page counts after which a prompt of ``prompt_len`` tokens stores a snapshot."""
        num_full = prompt_len // self.page_size
        ends = set(range(self.stride_pages, num_full + 1, self.stride_pages))
        ends.add(num_full)
        ends.add((prompt_len - 1) // self.page_size)
        return sorted(e for e in ends if e > 0)

    def branch_snapshot(self, hit: HybridHit) -> int | None:
        """Where a request that got ``hit`` should also store a snapshot: where the pages it
        found end (rounded down to ``align_pages``), if that is past its hit. Pages there were
        stored by a prompt that went on differently, so prompts branch there; a snapshot at
        the branch turns the next such request's recompute into a hit."""
        branch = hit.num_page_hits // self.align_pages * self.align_pages
        return branch if branch > hit.num_pages else None

    def _candidates(self, num_pages: int) -> list[int]:
        """Where to look for a snapshot inside a page hit of ``num_pages``: its end (a prompt's
        end), its end on the align grid (a branch), then the stride multiples below, longest
        first."""
        aligned = num_pages // self.align_pages * self.align_pages
        below = range((num_pages - 1) // self.stride_pages * self.stride_pages, 0, -self.stride_pages)
        out: list[int] = []
        for b in [num_pages, aligned, *below]:
            if b > 0 and b not in out:
                out.append(b)
        return out[: self.max_probes]

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> HybridHit:
        """Lease the longest hit of the rule (module doc). Release it with ``release``."""
        tokens = token_array(tokens)
        P = self.page_size
        limit = (len(tokens) - 1) // P if len(tokens) else 0
        pages = self.pages.lookup(tokens[: limit * P])
        probes, page_hits = 0, pages.num_hit_pages
        try:
            while pages.num_hit_pages:
                keys = pages.keys
                found = None
                for b in self._candidates(pages.num_hit_pages):
                    probes += 1
                    snap = self.snapshots.lookup(key_tokens(keys[b - 1]))
                    if snap.num_hit_pages:
                        found = (b, snap)
                        break
                    self.snapshots.release(snap)
                if found is None:
                    break
                b, snap = found
                if b == pages.num_hit_pages:
                    return HybridHit(pages, snap, b, probes, page_hits)
                # Lease exactly the b pages used (load() copies every leased page), then drop
                # the longer lease; a page evicted in between sends us round again.
                shorter = self.pages.lookup(tokens[: b * P])
                self.pages.release(pages)
                pages = shorter
                if shorter.num_hit_pages == b:
                    return HybridHit(pages, snap, b, probes, page_hits)
                self.snapshots.release(snap)
        except BaseException:
            self.pages.release(pages)
            raise
        # No usable snapshot: a miss (the lease on pages is given back at once).
        self.pages.release(pages)
        empty = self.pages.lookup(tokens[:0])
        return HybridHit(empty, None, 0, probes, page_hits)

    def load(self, hit: HybridHit, device_pages: Sequence[int],
             snapshot_slot: int) -> tuple[LoadHandle | None, LoadHandle | None]:
        """Start copying the hit's pages into ``device_pages`` and its snapshot into slot
        ``snapshot_slot`` of the snapshot cache's device pool. Either may raise LoadError."""
        if not hit.num_pages:
            return None, None
        page_handle = self.pages.load(hit.pages, list(device_pages)[: hit.num_pages])
        snap_handle = self.snapshots.load(hit.snapshot, [snapshot_slot])
        return page_handle, snap_handle

    def store(self, tokens: Sequence[int] | np.ndarray, device_pages: Sequence[int],
              snapshot_slots: dict[int, int]) -> HybridStoreResult:
        """Store the full pages of ``tokens`` and, for each page count b in ``snapshot_slots``,
        the snapshot after page b-1 that sits in that slot of the snapshot device pool.
        All or nothing across groups (module doc)."""
        tokens = token_array(tokens)
        P = self.page_size
        num_full = len(tokens) // P
        if not num_full:
            return HybridStoreResult(0, 0, 0)
        bad = [b for b in snapshot_slots if not 0 < b <= num_full]
        if bad:
            raise CacheError(f"snapshots after pages {bad} are outside the {num_full} full pages stored")
        res = self.pages.store(tokens[: num_full * P], list(device_pages)[:num_full])
        if res.num_skipped_pages:
            log.info("hybrid store: %d of %d pages could not be placed; their snapshots are not "
                     "stored", res.num_skipped_pages, num_full)
            return HybridStoreResult(num_full, res.num_new_pages, 0,
                                     res.num_skipped_pages + len(snapshot_slots))
        keys = page_keys(self._digest, tokens[: num_full * P], P)
        stored = skipped = 0
        for b, slot in sorted(snapshot_slots.items()):
            snap = self.snapshots.store(key_tokens(keys[b - 1]), [slot])
            skipped += snap.num_skipped_pages
            stored += snap.num_pages - snap.num_skipped_pages
        return HybridStoreResult(num_full, res.num_new_pages, stored, skipped)

    def release(self, hit: HybridHit) -> None:
        try:
            self.pages.release(hit.pages)
        finally:
            if hit.snapshot is not None:
                self.snapshots.release(hit.snapshot)

    def close(self) -> None:
        try:
            self.pages.close()
        finally:
            self.snapshots.close()
