"""prefix-LHD keeps its per-page state (last use, class) on runs of pages (UseRuns).

Checked against a plain per-page model of the same rules: every cached page's last
use and class agree after any mix of stores, lookups, links and removals, the runs
stay consistent, and the victims are the leaves of best (expiry, last use), peeled
one at a time. A chain used again and again settles into one run."""

from collections import OrderedDict

import pytest
from hypothesis import given, settings, strategies as st

from kvstore.eviction.prefix_lhd import PrefixLHDPolicy


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


class PerPageModel:
    """The rules, one page at a time (no runs, no heap)."""

    def __init__(self, num_classes: int, ghost_limit: int) -> None:
        self.k, self.ghost_limit = num_classes, ghost_limit
        self.clock = 0
        self.state: dict[bytes, tuple[int, int]] = {}  # key -> (last use, class)
        self.parent: dict[bytes, bytes] = {}
        self.ghost: OrderedDict[bytes, int] = OrderedDict()  # key -> class at eviction

    def insert(self, keys: list[bytes], parent: bytes | None) -> None:
        for key_ in keys:
            self.clock += 1
            previous = self.ghost.pop(key_, None)
            cls = 0 if previous is None else min(previous + 1, self.k - 1)
            self.state[key_] = (self.clock, cls)
            if parent in self.state:
                self.parent[key_] = parent
            parent = key_

    def access(self, keys: list[bytes]) -> None:
        for key_ in keys:
            self.clock += 1
            self.state[key_] = (self.clock, min(self.state[key_][1] + 1, self.k - 1))

    def link(self, child: bytes, parent: bytes) -> None:
        self.parent[child] = parent

    def remove(self, key_: bytes) -> None:
        _, cls = self.state.pop(key_)
        self.parent.pop(key_, None)
        for child in [c for c, p in self.parent.items() if p == key_]:
            del self.parent[child]   # children of a removed page become roots
        if self.ghost_limit:
            self.ghost[key_] = cls
            while len(self.ghost) > self.ghost_limit:
                self.ghost.popitem(last=False)

    def victims(self, n: int, retention: list[float], evictable) -> list[bytes]:
        """Best leaf by (used + retention[class], used), one at a time, each victim's
        parent a candidate once it has no other child left; a leased leaf is passed."""
        children: dict[bytes, int] = {}
        for p in self.parent.values():
            children[p] = children.get(p, 0) + 1
        out: list[bytes] = []
        skipped: set[bytes] = set()
        while len(out) < n:
            leaves = [k for k in self.state if not children.get(k) and k not in out and k not in skipped]
            if not leaves:
                return []
            best = min(leaves, key=lambda k: (self.state[k][0] + retention[self.state[k][1]], self.state[k][0]))
            if not evictable(best):
                skipped.add(best)
                continue
            out.append(best)
            p = self.parent.get(best)
            if p is not None:
                children[p] -= 1
        return out


class NotLeased:
    """``is_evictable`` with the index's bulk check, ``count_leading``."""

    def __init__(self, leased: set[bytes]) -> None:
        self.leased = leased

    def __call__(self, key_: bytes) -> bool:
        return key_ not in self.leased

    def count_leading(self, keys: list[bytes]) -> int:
        return next((i for i, k in enumerate(keys) if k in self.leased), len(keys))


def policy_state(policy: PrefixLHDPolicy) -> dict[bytes, tuple[int, int]]:
    runs = policy._runs
    return {key_: (run.used0 + pos - run.base, run.cls) for key_, (run, pos) in runs.where.items()}


OPS = st.lists(st.tuples(st.sampled_from(["store", "store", "lookup", "evict", "remove", "return"]),
                         st.integers(0, 10_000), st.integers(1, 6)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, capacity=st.sampled_from([4, 12, 40]))
def test_runs_keep_every_pages_state_as_the_per_page_rules_do(ops, capacity):
    policy = PrefixLHDPolicy(history_factor=2.0)
    policy.set_capacity(capacity)
    model = PerPageModel(4, int(2.0 * capacity))
    chains: list[list[bytes]] = []   # every chain stored, in order (its pages may be gone since)
    next_key = 0
    leased: set[bytes] = set()
    for op, pick, n in ops:
        cached = list(model.state)
        if op == "store" and len(cached) + n <= capacity:
            base = chains[pick % len(chains)] if chains and pick % 3 else []
            prefix = base[:pick % (len(base) + 1)]
            prefix = prefix[:next((i for i, k in enumerate(prefix) if k not in model.state), len(prefix))]
            new = [key(next_key + i) for i in range(n)]
            next_key += n
            parent = prefix[-1] if prefix else None
            policy.on_insert_run(new, parent)
            model.insert(new, parent)
            chains.append(prefix + new)
        elif op == "return" and chains:
            # pages evicted earlier come back (from L3): the ghost history gives their class
            chain = chains[pick % len(chains)]
            head = next((i for i, k in enumerate(chain) if k not in model.state), None)
            if head is None:
                continue
            back = [k for k in chain[head:head + n] if k not in model.state]
            back = back[:next((i for i, k in enumerate(back) if k != chain[head + i]), len(back))]
            if not back or len(cached) + len(back) > capacity:
                continue
            parent = chain[head - 1] if head else None
            policy.on_insert_run(back, parent)
            model.insert(back, parent)
            after = chain[head + len(back)] if head + len(back) < len(chain) else None
            if after is not None and after in model.state and after not in model.parent:
                policy.on_link(after, back[-1])   # as the index does: a waiting child is adopted
                model.link(after, back[-1])
        elif op == "lookup" and chains:
            chain = chains[pick % len(chains)]
            hit = chain[:next((i for i, k in enumerate(chain) if k not in model.state), len(chain))]
            hit = hit[:pick % (len(hit) + 1)]
            if hit:
                policy.on_access_run(hit)
                model.access(hit)
                if pick % 5 == 0:   # pages inside the chain leased, not only its front
                    leased.update(hit[-n:])
        elif op == "evict" and cached:
            # as the index gives it: a page check, and (every other time) a run's check at once
            evictable = NotLeased(leased) if pick % 2 else (lambda k: k not in leased)
            victims = policy.choose_victims(n, evictable)
            assert victims == model.victims(n, policy.retention, evictable)
            assert policy.choose_victims(n, evictable) == victims   # changes nothing
            policy.on_remove_many(victims)
            for v in victims:
                model.remove(v)
            leased.clear()
        elif op == "remove" and cached:
            victim = cached[pick % len(cached)]   # any page, a middle one too (a delete)
            policy.on_remove(victim)
            model.remove(victim)
        assert policy.check() is None
        assert policy_state(policy) == model.state


def test_a_chain_used_again_and_again_settles_into_one_run():
    policy = PrefixLHDPolicy()
    policy.set_capacity(10_000)
    chain = [key(i) for i in range(2048)]
    policy.on_insert_run(chain[:1024], None)
    policy.on_insert_run(chain[1024:], chain[1023])   # an agent's next turn: a second run
    policy.on_access_run(chain[:512])                  # a shorter prompt: a split
    assert policy.num_runs >= 2
    for _ in range(4):   # classes saturate (4 classes): one state for the whole chain
        policy.on_access_run(chain)
    assert policy.num_runs == 1 and policy.check() is None


def test_a_leased_leaf_keeps_its_parent_from_being_a_victim():
    policy = PrefixLHDPolicy()
    policy.set_capacity(16)
    a, b = key(1), key(2)
    policy.on_insert_run([a, b], None)
    policy.on_access_run([a])   # [a] and [b] are runs now; b, the leaf, is leased below
    assert policy.num_runs == 2
    assert policy.choose_victims(1, lambda k: k != b) == []
    assert policy.choose_victims(2, lambda k: True) == [b, a]


class _EveryClass:
    def __contains__(self, item) -> bool:
        return True


class _FitsEveryClassAfresh(PrefixLHDPolicy):
    """The same policy with no hull reused: every fit computes every class's hull."""

    def _fit(self) -> None:
        self._reset = _EveryClass()
        super()._fit()


def test_a_fit_that_reuses_unchanged_classes_hulls_fits_what_a_full_fit_does():
    import random

    rnd = random.Random(5)
    reused, fresh = PrefixLHDPolicy(), _FitsEveryClassAfresh()
    retentions = []
    for policy in (reused, fresh):
        policy.set_capacity(64)
    chains = [[key(1000 * c + i) for i in range(24)] for c in range(6)]
    for chain in chains[:2]:
        for policy in (reused, fresh):
            policy.on_insert_run(chain, None)
    for step in range(3000):   # the same two prompts again and again: most classes see nothing new
        chain = chains[step % 2] if step % 50 else chains[2 + step // 50 % 4]
        for policy in (reused, fresh):
            num_hit = next((i for i, k in enumerate(chain) if k not in policy._runs), len(chain))
            if num_hit:
                policy.on_access_run(chain[:num_hit])
            rest = chain[num_hit:]
            if rest:
                while len(policy) + len(rest) > 64:
                    policy.on_remove_many(policy.choose_victims(1, lambda k: True))
                policy.on_insert_run(rest, chain[num_hit - 1] if num_hit else None)
        if rnd.random() < 0.01:
            retentions.append((reused.retention, fresh.retention))
    assert len(retentions) > 10
    for a, b in retentions:
        assert a == pytest.approx(b, rel=1e-9)
    assert reused.choose_victims(16, lambda k: True) == fresh.choose_victims(16, lambda k: True)


def test_a_run_is_trimmed_up_to_its_first_leased_page_from_the_tail():
    policy = PrefixLHDPolicy()
    policy.set_capacity(64)
    chain = [key(i) for i in range(10)]
    policy.on_insert_run(chain, None)
    for evictable in (NotLeased({chain[6]}), lambda k: k != chain[6]):
        # the tail down to page 7 goes; page 6 is leased, so 6 and its parents stay
        assert policy.choose_victims(3, evictable) == [chain[9], chain[8], chain[7]]
        assert policy.choose_victims(4, evictable) == []
