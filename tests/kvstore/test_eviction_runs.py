"""on_access_run / on_insert_run (a lookup's hits, a store's new chain, in one call) have
the effect of on_access / on_insert per key."""

import random

import pytest

from kvstore.eviction import make_policy, policy_names
from kvstore.eviction.base import EvictionPolicy


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def drive_two(name: str, capacity: int, steps: int, max_run: int, seed: int, max_victims: int = 1) -> int:
    """The same random chain traffic into two instances, one batched and one per key;
    they must name the same victims throughout (up to ``max_victims`` at a time, removed
    by one ``on_remove_many`` from the batched one). Returns the victims compared."""
    batched, per_key = make_policy(name), make_policy(name)
    batched.set_capacity(capacity)
    per_key.set_capacity(capacity)
    rnd, cached, num_compared = random.Random(seed), [], 0
    present: set[bytes] = set()
    for _ in range(steps):
        roll = rnd.random()
        if len(cached) < capacity and roll < 0.5:
            room = min(capacity - len(cached), rnd.randrange(1, max_run))
            chain = [key(rnd.randrange(1 << 40)) for _ in range(room)]
            if present.intersection(chain) or len(set(chain)) != len(chain):
                continue
            parent = cached[-1] if cached and rnd.random() < 0.8 else None
            batched.on_insert_run(chain, parent)
            EvictionPolicy.on_insert_run(per_key, chain, parent)  # the per-key default
            cached.extend(chain)
            present.update(chain)
        elif cached and roll < 0.8:
            start = rnd.randrange(len(cached))
            run = cached[start:start + rnd.randrange(1, max_run)]
            if rnd.random() < 0.1:
                run = run + run[:2]  # a key twice in one run
            batched.on_access_run(run)
            EvictionPolicy.on_access_run(per_key, run)  # the per-key default
        elif cached:
            n = rnd.randrange(1, max_victims + 1)
            victims = batched.choose_victims(n, lambda k: True)
            assert victims == per_key.choose_victims(n, lambda k: True)
            if max_victims > 1:
                batched.on_remove_many(victims)
            for victim in victims:
                if max_victims == 1:
                    batched.on_remove(victim)
                per_key.on_remove(victim)
                cached.remove(victim)
                present.discard(victim)
                num_compared += 1
    return num_compared


@pytest.mark.parametrize("name", policy_names())
def test_a_batched_run_evicts_as_per_key_accesses_do(name):
    assert drive_two(name, capacity=48, steps=2500, max_run=24, seed=1) > 100


@pytest.mark.parametrize("name", policy_names())
def test_batched_removal_of_several_victims_is_per_key_removal(name):
    assert drive_two(name, capacity=48, steps=2500, max_run=24, seed=2, max_victims=6) > 100


def test_the_adaptive_policy_samples_and_ends_epochs_inside_runs_as_per_key():
    # 8,200 pages: every expert's miniature runs (64 pages, sampled 1/128) and epochs
    # end every 4,100 references, so runs of up to 300 cross epoch ends.
    assert drive_two("adaptive", capacity=8200, steps=5000, max_run=300, seed=2) > 500
