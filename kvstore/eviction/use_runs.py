"""UseRuns: a policy's view of the cached chains as runs of pages that share their use state.

An eviction policy that keeps a last use and a class per page (prefix-LHD)
spends most of its time writing those per page, although a lookup gives a
whole run of chained pages consecutive uses and the same class. Here a node
holds such a run::

    node:  keys  k0 k1 k2 ... k(m-1)      each the chain parent of the next
           used0                          k_i was last used at used0 + i
           cls                            the class of every page in it
           parent node, child nodes       children hang off the tail only

so a use of a whole node is a few assignments, and eviction trims a node from
its tail (the tail is the page used last, and evicting it leaves its parent
as the node's new tail). Nodes split where a use covers part of one, where a
branch leaves a page inside one and where a page in the middle is removed;
they merge again where a parent and its only child come to share their state
(one class, consecutive uses), so a chain reused often settles into one node.

``where[key] = (node, pos)``: ``pos - node.base`` is the key's place in its
node. ``base`` moves instead of positions when a node loses its front, so a
split or merge re-points only the keys of the smaller part.
"""

from __future__ import annotations

from itertools import repeat
from typing import Callable, Iterator, Sequence

from kvstore.page_keys import PageKey


class UseRun:
    """One node (see the module docstring)."""

    __slots__ = ("id", "keys", "base", "used0", "cls", "parent", "children")

    def __init__(self, run_id: int, keys: list[PageKey], base: int, used0: int, cls: int,
                 parent: UseRun | None) -> None:
        self.id = run_id
        self.keys = keys
        self.base = base
        self.used0 = used0
        self.cls = cls
        self.parent = parent
        self.children: set[UseRun] = set()

    @property
    def tail_used(self) -> int:
        return self.used0 + len(self.keys) - 1


class UseRuns:
    """The runs of one policy: lookup by key, splits, merges and tail trims."""

    def __init__(self, on_new_leaf: Callable[[UseRun], None]) -> None:
        self.where: dict[PageKey, tuple[UseRun, int]] = {}
        self.runs: dict[int, UseRun] = {}
        self._next_id = 0
        # Told when a split moves a leaf's pages into a new run (the policy's heap
        # knows leaves by run id).
        self._on_new_leaf = on_new_leaf

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: PageKey) -> bool:
        return key in self.where

    # ---- reading ---------------------------------------------------------------------
    def place(self, key: PageKey) -> tuple[UseRun, int]:
        """(run, place in it) of a cached key."""
        run, pos = self.where[key]
        return run, pos - run.base

    def parent_key(self, run: UseRun) -> PageKey | None:
        return run.parent.keys[-1] if run.parent is not None else None

    def iter_pages(self) -> Iterator[tuple[int, PageKey, PageKey | None]]:
        """(last use, key, cached parent or None) of every page, in no order."""
        for run in self.runs.values():
            parent = self.parent_key(run)
            for i, key in enumerate(run.keys):
                yield run.used0 + i, key, parent
                parent = key

    # ---- building --------------------------------------------------------------------
    def add(self, keys: list[PageKey], parent_key: PageKey | None, used0: int, cls: int) -> UseRun:
        """New pages, each the chain parent of the next, under ``parent_key`` (if cached).
        They join the parent's run when it ends there, has no child and its state goes
        on into theirs; otherwise they start a run of their own. Returns their run."""
        parent = None
        if parent_key is not None and parent_key in self.where:
            parent = self.make_tail(parent_key)
            if (not parent.children and parent.cls == cls
                    and parent.tail_used + 1 == used0):
                self._point(keys, parent, parent.base + len(parent.keys))
                parent.keys += keys
                return parent
        run = self._new(keys, 0, used0, cls, parent)
        self._point(keys, run, 0)
        return run

    def link(self, child_key: PageKey, parent_key: PageKey) -> UseRun:
        """``child_key``'s run (it heads one: it had no cached parent) goes under the
        run now ending in ``parent_key``. Returns the parent's run."""
        child, p = self.place(child_key)
        assert p == 0 and child.parent is None, "only a run's first page waits for a parent"
        parent = self.make_tail(parent_key)
        child.parent = parent
        parent.children.add(child)
        return parent

    def make_tail(self, key: PageKey) -> UseRun:
        """Split ``key``'s run after ``key``; returns the run ``key`` now ends."""
        run, p = self.place(key)
        if p < len(run.keys) - 1:
            run, _ = self.split(run, p + 1)
        return run

    def split(self, run: UseRun, cut: int) -> tuple[UseRun, UseRun]:
        """Cut ``run`` after its first ``cut`` pages: (head, tail), the tail the head's only
        child. The smaller part becomes a new run (its keys are re-pointed); the other
        keeps ``run``'s identity."""
        keys = run.keys
        if cut <= len(keys) - cut:   # the head is new: the tail keeps run (and its children)
            head = self._new(keys[:cut], run.base, run.used0, run.cls, run.parent)  # (a child of run's parent)
            if run.parent is not None:
                run.parent.children.discard(run)
            self._point(head.keys, head, head.base)
            del keys[:cut]
            run.base += cut
            run.used0 += cut
            run.parent = head
            head.children = {run}
            return head, run
        tail = self._new(keys[cut:], run.base + cut, run.used0 + cut, run.cls, None)
        self._point(tail.keys, tail, tail.base)
        del keys[cut:]
        tail.children, run.children = run.children, {tail}
        tail.parent = run
        for child in tail.children:
            child.parent = tail
        if not tail.children:
            self._on_new_leaf(tail)
        return run, tail

    def isolate(self, run: UseRun, p: int, m: int) -> UseRun:
        """The run holding exactly ``run.keys[p:p+m]`` after the splits it takes."""
        if p + m < len(run.keys):
            run, _ = self.split(run, p + m)
        if p:
            _, run = self.split(run, p)
        return run

    def merge_into_parent(self, run: UseRun) -> UseRun:
        """Merge ``run`` with its parent if it is the parent's only child and their states
        join (one class, consecutive uses); returns the run its pages are in now."""
        parent = run.parent
        if (parent is None or len(parent.children) != 1 or parent.cls != run.cls
                or parent.tail_used + 1 != run.used0):
            return run
        if len(parent.keys) <= len(run.keys):   # run keeps its identity and takes the front
            self._point(parent.keys, run, run.base - len(parent.keys))
            run.keys[:0] = parent.keys
            run.base -= len(parent.keys)
            run.used0 = parent.used0
            self._replace_child(parent, run)
            run.parent = parent.parent
            del self.runs[parent.id]
            return run
        self._point(run.keys, parent, parent.base + len(parent.keys))
        parent.keys += run.keys
        parent.children = run.children
        for child in parent.children:
            child.parent = parent
        del self.runs[run.id]
        return parent

    # ---- removing --------------------------------------------------------------------
    def trim(self, run: UseRun, m: int) -> tuple[list[PageKey], UseRun | None]:
        """Remove ``run``'s last ``m`` pages (the caller read their state first). Their
        children become roots. Returns (the keys, last first; the run whose tail is a
        leaf now: ``run`` if pages are left, else its parent if that has no child left)."""
        keys, where = run.keys, self.where
        cut = len(keys) - m
        gone = keys[cut:]
        for key in gone:
            del where[key]
        del keys[cut:]
        gone.reverse()
        for child in run.children:
            child.parent = None
        run.children = set()
        if keys:
            return gone, run
        del self.runs[run.id]
        parent = run.parent
        if parent is None:
            return gone, None
        parent.children.discard(run)
        return gone, None if parent.children else parent

    # ---- helpers ---------------------------------------------------------------------
    def _new(self, keys: list[PageKey], base: int, used0: int, cls: int, parent: UseRun | None) -> UseRun:
        run = UseRun(self._next_id, keys, base, used0, cls, parent)
        self._next_id += 1
        self.runs[run.id] = run
        if parent is not None:
            parent.children.add(run)
        return run

    def _point(self, keys: Sequence[PageKey], run: UseRun, first_pos: int) -> None:
        self.where.update(zip(keys, zip(repeat(run), range(first_pos, first_pos + len(keys)))))

    @staticmethod
    def _replace_child(old: UseRun, new: UseRun) -> None:
        if old.parent is not None:
            old.parent.children.discard(old)
            old.parent.children.add(new)

    # ---- checks ----------------------------------------------------------------------
    def check(self) -> str | None:
        """What is inconsistent, or None. O(pages); for tests."""
        seen = 0
        for run in self.runs.values():
            if not run.keys:
                return f"run {run.id} is empty"
            for i, key in enumerate(run.keys):
                if self.where.get(key) != (run, run.base + i):
                    return f"page {key.hex()} is misplaced in run {run.id}"
            seen += len(run.keys)
            if run.parent is not None and (run not in run.parent.children or run.parent.id not in self.runs):
                return f"run {run.id} is not among its parent's children"
            if any(child.parent is not run for child in run.children):
                return f"run {run.id} has a child that names another parent"
        if seen != len(self.where):
            return f"runs hold {seen} pages, the map {len(self.where)}"
        return None
