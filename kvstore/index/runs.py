"""RunTree: the cached pages of one tier as runs of chained pages (a radix tree).

A *run* is a node of the tree: pages each of which is the chain parent of the
next, with no branch inside. Branches and gaps cut runs::

    cached chains                      runs (nodes)
    s0 s1 s2 a3 a4 a5                  [s0 s1 s2] ─┬─ [a3 a4 a5]
             b3 b4                                └─ [b3 b4]
    (c7's parent c6 not cached) c7 c8  [c7 c8]  waiting for c6

Children hang off a run's *tail* only (a branch inside a run splits it), so
a run's children are the runs whose first page's parent is its tail page. A
run whose first page's parent is not cached waits under that parent's key;
when the parent arrives it adopts the run (and absorbs it when it is the
only one, so a gap filled later leaves one run, not two).

Per-page state is flat: a dict key -> entry (a dense id below capacity) and
numpy arrays indexed by entry::

    entry e:     0    1    2    3    4 ...
    run_id[e]:   7    7    9    7    9       the run holding the page
    pos[e]:     10   11   20   12   21       its place: pos[e] - run.base
    slot[e]:   ...                           the caller's slot number

A run keeps ``base`` so that cutting it (split, or a page leaving its front)
moves no positions: the tail run takes ``base + cut``, and only ``run_id``
of the tail's entries changes (one vectorised store).

Lookup walks runs: one dict probe per run it enters, then a C-level
compare of the run's keys against the query's (list equality), so its
Python work follows the number of runs on the path, not the pages.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import numpy as np

from kvstore.page_keys import PageKey, num_matching, num_walked_back


_EMPTY = np.zeros(0, dtype=np.int64)


class _Run:
    """One node: ``keys[i]`` at entry ``buf[i]``; ``keys[0]``'s chain parent is ``parent_key``.
    ``buf`` is a growable array whose first ``len(keys)`` items are the run's entries."""

    __slots__ = ("id", "keys", "buf", "base", "parent_key", "children")

    def __init__(self, run_id: int, parent_key: PageKey | None, base: int = 0) -> None:
        self.id = run_id
        self.keys: list[PageKey] = []
        self.buf = _EMPTY
        self.base = base  # pos[e] - base is the place of entry e in this run
        self.parent_key = parent_key
        self.children: set[_Run] = set()  # runs whose parent_key is keys[-1]

    @property
    def entries(self) -> np.ndarray:
        return self.buf[:len(self.keys)]

    def reserve(self, size: int) -> None:
        """Room in ``buf`` for ``size`` entries (doubling, so appends stay O(1) amortised)."""
        if size > len(self.buf):
            buf = np.empty(max(size, 2 * len(self.buf), 8), dtype=np.int64)
            buf[:len(self.keys)] = self.buf[:len(self.keys)]
            self.buf = buf


class RunTree:
    """Names and places of the cached pages (see the module docstring). Knows nothing of
    leases or eviction; :class:`kvstore.index.tier_index.TierIndex` adds those."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entry_of: dict[PageKey, int] = {}
        self.slot = np.zeros(capacity, dtype=np.int64)
        self._run_id = np.zeros(capacity, dtype=np.int64)
        self._pos = np.zeros(capacity, dtype=np.int64)
        self._free_entries = list(range(capacity - 1, -1, -1))
        self._runs: dict[int, _Run] = {}
        self._next_run_id = 0
        self._waiting: dict[PageKey, set[_Run]] = {}  # uncached parent key -> runs under it

    def __len__(self) -> int:
        return len(self.entry_of)

    @property
    def num_runs(self) -> int:
        return len(self._runs)

    # ---- walking (changes nothing) -------------------------------------------------
    def segments(self, keys: Sequence[PageKey]) -> Iterator[tuple[_Run, int, int]]:
        """(run, place in run, length) of the leading cached keys, in order; stops at
        the first absent key. Python work per run entered, C-level compares per page."""
        entry_of, run_id, pos, runs = self.entry_of, self._run_id, self._pos, self._runs
        if not isinstance(keys, list):
            keys = list(keys)  # a list slice compares with a list slice only
        i, n = 0, len(keys)
        while i < n:
            e = entry_of.get(keys[i])
            if e is None:
                return
            run = runs[int(run_id[e])]
            p = int(pos[e]) - run.base
            m = num_matching(run.keys, p, keys, i)
            yield run, p, m
            i += m

    def match_prefix(self, keys: Sequence[PageKey]) -> int:
        """How many leading keys are cached."""
        return sum(m for _, _, m in self.segments(keys))

    def entries_of(self, keys: Sequence[PageKey]) -> np.ndarray | None:
        """Entries of the keys, in order, or None if one is absent."""
        parts = [run.buf[p:p + m] for run, p, m in self.segments(keys)]
        if sum(map(len, parts)) != len(keys):
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [_EMPTY])

    # ---- changes ---------------------------------------------------------------------
    def add(self, key: PageKey, slot: int, parent: PageKey | None) -> tuple[int, list[PageKey]]:
        """Place a new key (the caller checked it is absent and there is room). Returns its
        entry and the first keys of the runs it adopted (its cached children)."""
        if parent == key:
            parent = None  # a page cannot follow itself
        e = self._free_entries.pop()
        self.slot[e] = slot
        pe = self.entry_of.get(parent) if parent is not None else None
        self.entry_of[key] = e
        if pe is not None:
            prun = self._runs[int(self._run_id[pe])]
            cut = int(self._pos[pe]) - prun.base + 1
            if cut == len(prun.keys) and not prun.children:
                run = prun  # the common case: a chain grows at its tail
            else:
                if cut < len(prun.keys):
                    self._split(prun, cut)
                run = self._new_run(parent, base=0)
                prun.children.add(run)
        else:
            run = self._new_run(parent, base=0)
            if parent is not None:
                self._waiting.setdefault(parent, set()).add(run)
        self._append(run, key, e)
        return e, self._adopt(run, key)

    def add_chain(self, keys: list[PageKey], slots: Sequence[int],
                  parent: PageKey | None) -> list[tuple[int, list[PageKey]]]:
        """``add`` each key in order, ``keys[i]``'s parent being ``keys[i-1]`` (the first's
        ``parent``). Returns (i, children adopted by keys[i]) where any were. When nothing
        waits for keys[1:], they join the first's run as arrays, without a step per page."""
        _, children = self.add(keys[0], slots[0], parent)
        adopted = [(0, children)] if children else []
        rest = keys[1:]
        if not rest:
            return adopted
        if children or not self._waiting.keys().isdisjoint(rest):
            for i in range(1, len(keys)):
                _, children = self.add(keys[i], slots[i], keys[i - 1])
                if children:
                    adopted.append((i, children))
            return adopted
        run = self._runs[int(self._run_id[self.entry_of[keys[0]]])]  # keys[0] is its tail
        entries = np.array(self._free_entries[-1:-len(rest) - 1:-1], dtype=np.int64)
        del self._free_entries[-len(rest):]
        n = len(run.keys)
        self.slot[entries] = slots[1:]
        self._run_id[entries] = run.id
        self._pos[entries] = np.arange(run.base + n, run.base + n + len(rest))
        run.reserve(n + len(rest))
        run.buf[n:n + len(rest)] = entries
        run.keys += rest
        self.entry_of.update(zip(rest, entries.tolist()))
        return adopted

    def remove(self, key: PageKey) -> int:
        """Take a present key out; returns its (now free) entry. Its cached children
        wait under its key until it comes back."""
        e = self.entry_of[key]
        run = self._runs[int(self._run_id[e])]
        cut = int(self._pos[e]) - run.base + 1
        if cut < len(run.keys):
            self._split(run, cut)  # now key is run's tail
        run.keys.pop()
        if run.children:
            self._waiting[key] = run.children
            run.children = set()
        if not run.keys:
            self._detach(run)
            del self._runs[run.id]
        del self.entry_of[key]
        self._free_entries.append(e)
        return e

    def remove_many(self, keys: Sequence[PageKey]) -> list[int]:
        """``remove`` each key in order; their (now free) entries. Where the keys walk a
        run back from its tail (an eviction peeling a chain: tail, then the page before
        it, ...), the run is trimmed at once instead of page by page; the result is
        what ``remove`` per key leaves, entries freed in the same order."""
        keys = keys if isinstance(keys, list) else list(keys)   # (list slices compare with lists)
        entry_of, run_id, pos, runs = self.entry_of, self._run_id, self._pos, self._runs
        freed: list[int] = []
        i, n = 0, len(keys)
        while i < n:
            key = keys[i]
            e = entry_of[key]
            run = runs[int(run_id[e])]
            p = int(pos[e]) - run.base
            m = 1
            if p == len(run.keys) - 1 and i + 1 < n:   # the tail: how many next keys are the pages before it
                m = num_walked_back(run.keys, p, keys, i)
            freed.append(self.remove(key))   # the tail goes as remove does it (its children wait)
            if m > 1:   # then run.keys[p - m + 1 : p] go, last first; none has other children
                cut = p - m + 1
                gone = run.keys[cut:]
                entries = run.buf[cut:len(run.keys)].tolist()[::-1]
                del run.keys[cut:]
                deque(map(entry_of.__delitem__, gone), maxlen=0)   # the loop in C
                self._free_entries.extend(entries)
                freed.extend(entries)
                if not run.keys:
                    self._detach(run)
                    del runs[run.id]
            i += m
        return freed

    def _new_run(self, parent_key: PageKey | None, base: int) -> _Run:
        run = _Run(self._next_run_id, parent_key, base)
        self._next_run_id += 1
        self._runs[run.id] = run
        return run

    def _append(self, run: _Run, key: PageKey, e: int) -> None:
        self._run_id[e] = run.id
        self._pos[e] = run.base + len(run.keys)
        run.reserve(len(run.keys) + 1)
        run.buf[len(run.keys)] = e
        run.keys.append(key)

    def _split(self, run: _Run, cut: int) -> None:
        """Cut ``run`` after its ``cut`` first pages; the rest becomes its only child."""
        tail = self._new_run(run.keys[cut - 1], base=run.base + cut)
        tail.keys, tail.buf = run.keys[cut:], run.entries[cut:].copy()
        del run.keys[cut:]
        tail.children, run.children = run.children, {tail}
        self._run_id[tail.buf] = tail.id  # positions stay: tail.base absorbs the cut

    def _adopt(self, run: _Run, key: PageKey) -> list[PageKey]:
        """Runs waiting for ``key`` (now ``run``'s tail) become its children; a single
        one is absorbed, so a filled gap leaves one run."""
        orphans = self._waiting.pop(key, None)
        if not orphans:
            return []
        firsts = [child.keys[0] for child in orphans]
        if len(orphans) == 1:
            (child,) = orphans
            shift = run.base + len(run.keys) - child.base
            moved = child.entries
            self._run_id[moved] = run.id
            self._pos[moved] += shift
            n = len(run.keys)
            run.reserve(n + len(moved))
            run.buf[n:n + len(moved)] = moved
            run.keys += child.keys
            run.children = child.children
            del self._runs[child.id]
        else:
            run.children = orphans
        return firsts

    def _detach(self, run: _Run) -> None:
        """Unhook an empty run from its parent run or from the waiting list."""
        parent = run.parent_key
        pe = self.entry_of.get(parent) if parent is not None else None
        if pe is not None:
            self._runs[int(self._run_id[pe])].children.discard(run)
        elif parent is not None:
            waiting = self._waiting[parent]
            waiting.discard(run)
            if not waiting:
                del self._waiting[parent]

    # ---- checks ----------------------------------------------------------------------
    def check(self) -> str | None:
        """What is inconsistent, or None. O(pages); for tests and idle checks."""
        if len(self.entry_of) + len(self._free_entries) != self.capacity:
            return "entries leaked"
        seen = 0
        for run in self._runs.values():
            problem = self._check_run(run)
            if problem:
                return problem
            seen += len(run.keys)
        if seen != len(self.entry_of):
            return f"runs hold {seen} pages, the map {len(self.entry_of)}"
        for parent, runs in self._waiting.items():
            if parent in self.entry_of or any(r.parent_key != parent or r.id not in self._runs for r in runs):
                return f"a run waits for a cached or wrong parent {parent.hex()}"
        return None

    def _check_run(self, run: _Run) -> str | None:
        if not run.keys or len(run.buf) < len(run.keys):
            return f"run {run.id} is empty or ragged"
        for i, (key, e) in enumerate(zip(run.keys, run.entries.tolist())):
            if self.entry_of.get(key) != e or self._run_id[e] != run.id or self._pos[e] != run.base + i:
                return f"page {key.hex()} is misplaced in run {run.id}"
        if any(child.parent_key != run.keys[-1] or child.id not in self._runs for child in run.children):
            return f"run {run.id} has a child that does not follow its tail"
        parent = run.parent_key
        if parent is not None and parent in self.entry_of:
            prun = self._runs[int(self._run_id[self.entry_of[parent]])]
            if prun.keys[-1] != parent or run not in prun.children:
                return f"run {run.id} is not a child of its cached parent's run"
        elif parent is not None and run not in self._waiting.get(parent, ()):
            return f"run {run.id} does not wait for its uncached parent"
        return None
