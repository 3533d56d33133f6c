"""Golden outputs of the hybrid model through the cache: a cache-on run equals the cache-off
run split at the same boundary, bit for bit (tokens and logits), for hits at and between
snapshots, branching prompts, an evicted snapshot and a corrupted one, on L2, L3 disk and
L3 Redis, embedded and with daemons as processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "connectors"))
sys.path.insert(0, str(HERE.parent / "daemon"))

from controller import ControllerConfig, L3Config, connect  # noqa: E402
from controller.hybrid import SNAPSHOT_PREFETCH, HybridCache, key_tokens, snapshot_config  # noqa: E402
from decoder.hybrid_config import HybridConfig  # noqa: E402
from decoder.hybrid_engine import HybridEngine  # noqa: E402
from decoder.hybrid_model import HybridDecoder  # noqa: E402
from kvstore.page_keys import KeyNamespace, page_keys  # noqa: E402

P, STRIDE, ALIGN, NEW = 8, 4, 2, 3   # ALIGN: the scan block (16 tokens) in pages
CONFIG = HybridConfig.preset("tiny-hybrid-swa")   # SSD + window + full attention layers


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return HybridDecoder(CONFIG)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, CONFIG.base.vocab_size, n).tolist()


A = tokens(1, 75)           # 9 full pages: snapshots after pages 4, 8 and 9


def namespaces(engine: HybridEngine) -> tuple[KeyNamespace, KeyNamespace]:
    return (KeyNamespace(CONFIG.model_id, engine.pools.kv_layout),
            KeyNamespace(CONFIG.model_id, engine.snapshot_layout))


def embedded(engine: HybridEngine, l3: tuple[L3Config, L3Config] | None = None,
             snapshot_pages: int = 16) -> HybridCache:
    """Pages and snapshots, each with its embedded client (one per layout), on ``l3`` (the
    pages' L3, the snapshots')."""
    kv_ns, snap_ns = namespaces(engine)
    l3 = l3 or (L3Config(), L3Config())
    pages = connect(ControllerConfig(host_pool_pages=64, l3=l3[0]), kv_ns, engine.pools.kv)
    snaps = connect(snapshot_config(ControllerConfig(host_pool_pages=snapshot_pages, l3=l3[1])), snap_ns,
                    engine.snapshot_pool)
    cache = HybridCache(pages, snaps, kv_ns.digest(), STRIDE, align_pages=ALIGN)
    engine.attach_cache(cache)
    return cache


def golden(on: HybridEngine, off: HybridEngine, prompt: list[int], cached: int):
    """Run ``prompt`` with the cache; it must hit ``cached`` tokens and equal the cache-off
    run split there."""
    got = on.generate(prompt, NEW)
    want = off.generate(prompt, NEW, split_at=got.num_cached_tokens)
    assert got.num_cached_tokens == cached
    assert got.tokens == want.tokens
    assert torch.equal(got.logits, want.logits)
    return got


def snapshot_l3_key(engine: HybridEngine, prompt: list[int], num_pages: int) -> bytes:
    kv_ns, snap_ns = namespaces(engine)
    page_key = page_keys(kv_ns.digest(), prompt[: num_pages * P], P)[-1]
    return page_keys(snap_ns.digest(), key_tokens(page_key), len(key_tokens(page_key)))[0]


def conversation(model, cache_factory):
    """The L2 scenarios on a cache made by ``cache_factory(engine)``; returns the engines."""
    on, off = HybridEngine(model, P, 48), HybridEngine(model, P, 48)
    cache = cache_factory(on)
    first = golden(on, off, A, 0)
    assert first.num_snapshots_stored == 3
    golden(on, off, A, 72)                                  # resent: at the prompt-end snapshot
    golden(on, off, A[:64] + tokens(2, 20), 64)             # branch at a stride snapshot
    golden(on, off, A[:50] + tokens(3, 30), 32)             # branch between snapshots: back to 4 pages
    golden(on, off, A[:50] + tokens(11, 25), 48)            # ... which left one at the branch (6 pages)
    golden(on, off, A[:60] + tokens(13, 20), 48)            # pages to 7: the branch on the scan grid
    golden(on, off, A + first.tokens + tokens(4, 20), 72)   # the next turn
    return on, off, cache


def test_l2_embedded(model):
    on, off, cache = conversation(model, embedded)
    cache.close()


def test_evicted_snapshot_shortens_the_hit(model):
    on, off = HybridEngine(model, P, 48), HybridEngine(model, P, 48)
    cache = embedded(on, snapshot_pages=3)
    golden(on, off, A, 0)
    golden(on, off, tokens(5, 75), 0)        # its 3 snapshots evict A's
    follow = A + tokens(6, 10)
    pages = cache.pages.lookup(follow)
    assert pages.num_hit_pages == 10 - 1     # A's pages are all still there ...
    cache.pages.release(pages)
    golden(on, off, follow, 0)               # ... but no snapshot: no hit, and exact output
    golden(on, off, follow, 80)              # stored again by that run
    cache.close()


def corrupt_file_of(root: Path, key: bytes) -> None:
    matches = [p for p in root.rglob("*") if p.is_file() and p.name == key.hex()]
    assert len(matches) == 1, f"no L3 file for {key.hex()} under {root}"
    data = bytearray(matches[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    matches[0].write_bytes(bytes(data))


def l3_round(model, l3: tuple[L3Config, L3Config], corrupt) -> None:
    """Store A through L3, reopen (empty L2), hit it from L3; corrupt its end snapshot in L3,
    reopen, and hit the stride snapshot before it instead."""
    on, off = HybridEngine(model, P, 48), HybridEngine(model, P, 48)
    cache = embedded(on, l3)
    golden(on, off, A, 0)
    cache.close()
    cache = embedded(on, l3)
    follow = A + tokens(7, 12)
    got = golden(on, off, follow, 72)
    assert got.snapshot_tier == "L3" and got.num_l3_tokens == 72
    cache.close()
    corrupt(snapshot_l3_key(on, A, 9))
    cache = embedded(on, l3)
    golden(on, off, A + tokens(9, 5), 64)          # the bad snapshot is a miss: page 8's is used
    assert cache.snapshots.stats().num_l3_bad_values >= 1
    cache.close()


def test_l3_disk_embedded(model, tmp_path):
    l3 = tuple(L3Config(connector="disk", write_policy="write_through",
                        options={"path": str(tmp_path / name), "capacity_bytes": 1 << 28})
               for name in ("l3kv", "l3snap"))
    l3_round(model, l3, lambda key: corrupt_file_of(tmp_path / "l3snap", key))


def test_l3_redis_embedded(model):
    import l3_servers
    import redis

    with l3_servers.redis_server_or_skip() as srv:
        one = L3Config(connector="redis", write_policy="write_through",
                       options={"host": "127.0.0.1", "port": srv.port, "key_prefix": b"hy:"})
        l3 = (one, one)
        client = redis.Redis(host="127.0.0.1", port=srv.port)

        def corrupt(key: bytes) -> None:
            value = bytearray(client.get(b"hy:" + key))
            value[len(value) // 2] ^= 0xFF
            client.set(b"hy:" + key, bytes(value))

        try:
            l3_round(model, l3, corrupt)
        finally:
            client.close()


@pytest.mark.slow
def test_daemons_l2_and_l3(model, tmp_path):
    """One daemon per layout (pages, snapshots) as processes, each with a disk L3; the
    snapshot daemon's L2 holds 2 snapshots, so older ones come back from its disk."""
    from daemon_proc import DaemonProcess

    on, off = HybridEngine(model, P, 48), HybridEngine(model, P, 48)
    kv_ns, snap_ns = namespaces(on)

    def start(name: str, layout, host_pages: int) -> DaemonProcess:
        (tmp_path / name / "run").mkdir(parents=True)
        l3dir = tmp_path / name / "l3"
        return DaemonProcess(tmp_path / name, name=name, layout=layout, host_pages=host_pages, args=[
            "--l3-connector", "disk", "--l3-write-policy", "write_through",
            "--l3-options", f'{{"path": "{l3dir}", "capacity_bytes": {1 << 28}}}'])

    daemons = [start("kv", kv_ns.layout, 64), start("snap", snap_ns.layout, 2)]
    try:
        for d in daemons:
            d.start(wait=False)
        for d in daemons:
            d.wait_ready()
        pages = daemons[0].client(on.pools.kv, kv_ns)
        snaps = daemons[1].client(on.snapshot_pool, snap_ns, prefetch=SNAPSHOT_PREFETCH)
        cache = HybridCache(pages, snaps, kv_ns.digest(), STRIDE, align_pages=ALIGN)
        on.attach_cache(cache)
        try:
            first = golden(on, off, A, 0)                       # 3 snapshots: the first one spills
            golden(on, off, A + first.tokens + tokens(4, 20), 72)
            got = golden(on, off, A[:50] + tokens(3, 30), 32)   # the snapshot after page 4
            assert got.snapshot_tier == "L3"
        finally:
            cache.close()
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.slow
def test_one_daemon_serves_pages_and_snapshots(model, tmp_path):
    """A daemon of every layout (no --layout-*): the pages and the snapshots are two pools of
    one daemon under one memory budget; hits and a branch stay bit-exact."""
    from daemon_proc import DaemonProcess

    on, off = HybridEngine(model, P, 48), HybridEngine(model, P, 48)
    kv_ns, snap_ns = namespaces(on)
    (tmp_path / "run").mkdir()
    daemon = DaemonProcess(tmp_path, layout=None, args=["--host-pool-bytes", "64M"]).start()
    try:
        pages = daemon.client(on.pools.kv, kv_ns)
        snaps = daemon.client(on.snapshot_pool, snap_ns, prefetch=SNAPSHOT_PREFETCH)
        cache = HybridCache(pages, snaps, kv_ns.digest(), STRIDE, align_pages=ALIGN)
        on.attach_cache(cache)
        try:
            first = golden(on, off, A, 0)
            golden(on, off, A + first.tokens + tokens(4, 20), 72)
            assert golden(on, off, A[:50] + tokens(3, 30), 32).snapshot_tier == "L2"
        finally:
            cache.close()
        pools = json.loads(daemon.stats()["pools"])
        assert sorted(pool["layout"] for pool in pools) == sorted(
            [kv_ns.layout.fingerprint(), snap_ns.layout.fingerprint()]), pools
    finally:
        daemon.stop()


def test_stores_are_all_or_nothing(model):
    """Pages that could not all be placed get no snapshot; snapshots that could not be placed
    leave pages that are no hit. Either way the next run recomputes, exactly."""
    on, off = HybridEngine(model, P, 48), HybridEngine(model, P, 48)
    kv_ns, snap_ns = namespaces(on)
    pages = connect(ControllerConfig(host_pool_pages=4), kv_ns, on.pools.kv)        # < A's 9 pages
    snaps = connect(snapshot_config(ControllerConfig(host_pool_pages=4)), snap_ns, on.snapshot_pool)
    on.attach_cache(HybridCache(pages, snaps, kv_ns.digest(), STRIDE, align_pages=ALIGN))
    assert golden(on, off, A, 0).num_snapshots_stored == 0
    golden(on, off, A, 0)
    on.cache.close()

    pages = connect(ControllerConfig(host_pool_pages=64), kv_ns, on.pools.kv)
    snaps = connect(snapshot_config(ControllerConfig(host_pool_pages=1)), snap_ns, on.snapshot_pool)
    cache = HybridCache(pages, snaps, kv_ns.digest(), STRIDE, align_pages=ALIGN)
    on.attach_cache(cache)
    other = tokens(10, 20)
    golden(on, off, other, 0)                      # its one snapshot takes the only slot ...
    held = cache.lookup(other)                     # ... and stays leased
    assert held.num_pages == 2
    assert golden(on, off, A, 0).num_snapshots_stored == 0
    cache.release(held)
    probe = cache.pages.lookup(A)
    assert probe.num_hit_pages == 9                # every page of A is there, no snapshot:
    cache.pages.release(probe)
    golden(on, off, A, 0)                          # no hit
    cache.close()
