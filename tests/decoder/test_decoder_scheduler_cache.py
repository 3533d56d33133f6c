"""The scheduler over the real embedded cache with a disk L3 and an L2 too small for the
sessions, so most hits come back up from disk: for every prefetch policy, with and without
resume hints, every token and logit equals a run without a cache, bit for bit."""

import pytest
import torch
from decoder_fakes import make_engine, random_tokens, tiny_model

from controller import ControllerConfig, L3Config, connect
from controller.config import PrefetchConfig
from decoder.scheduler import ADMISSION_POLICIES, Request, Scheduler
from kvstore.page_keys import KeyNamespace

P = 8


def conversation(turns=3, sessions=3):
    """(session, new tokens, max_new_tokens) per request: sessions over one system prompt."""
    return random_tokens(40, 7), [
        (s, random_tokens(9 + 4 * s + 3 * t, 100 * t + s), 2 + s) for t in range(turns) for s in range(sessions)
    ]


def run_sessions(scheduler, hints: bool):
    system, steps = conversation()
    history: dict[int, list[int]] = {}
    outputs = []
    for i, (session, new, max_new) in enumerate(steps):
        if hints and session in history:
            scheduler.resume(session)  # the session is about to come back: prefetch its context
        scheduler.submit(Request(session, history.get(session, system) + new, max_new, tag=i))
        if session == 2:  # one turn of every session queued: run them together
            for c in scheduler.run_until_idle():
                history[c.request.session] = list(c.request.prompt) + c.result.tokens
                outputs.append(c)
                if hints:
                    scheduler.pause(c.request.session)  # e.g. waits on a tool call
    return sorted(outputs, key=lambda c: c.request.tag)


@pytest.fixture(scope="module")
def plain_outputs():
    # Module fixtures run before the autouse one-thread fixture; thread count changes bits.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_sessions(Scheduler(make_engine(P, 128), "sync"), hints=False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("hints", [False, True], ids=["no-hints", "hints"])
@pytest.mark.parametrize("policy", sorted(ADMISSION_POLICIES))
def test_scheduler_with_prefetch_equals_no_cache(tmp_path, plain_outputs, policy, hints):
    engine = make_engine(P, 128, model=tiny_model())
    config = ControllerConfig(
        host_pool_pages=12, prefetch=PrefetchConfig(policy=policy),
        l3=L3Config("disk", {"path": str(tmp_path / "disk"), "capacity_bytes": 1 << 30}))
    cache = connect(config, KeyNamespace(engine.model.config.model_id, engine.layout), engine.kv_pool)
    engine.attach_cache(cache)
    try:
        outputs = run_sessions(Scheduler(engine, policy), hints)
        stats = cache.stats()
        cache.check_integrity(quiescent=True)
    finally:
        cache.close()
    assert len(outputs) == len(plain_outputs) == 9
    for got, want in zip(outputs, plain_outputs):
        assert got.request.prompt == want.request.prompt
        assert got.result.tokens == want.result.tokens
        assert torch.equal(got.result.logits, want.result.logits)
    assert sum(c.result.num_cached_tokens for c in outputs) > 0
    assert stats.num_l3_written_pages > 0  # L2 of 12 pages spilled to disk
    engine.allocator.check_integrity()
    assert engine.allocator.num_free == 128
