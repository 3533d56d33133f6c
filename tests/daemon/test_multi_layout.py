"""One daemon, every layout (issue 19, part 1): `kvstore serve` without a layout builds a
pool per layout its clients name, all under one memory budget, evicted fairly."""

import json

import pytest
import torch

from controller.api import LoadError
from controller.config import ConfigError
from controller.daemon.config import check_budget, default_pool_bytes, load_config
from daemon_proc import running_daemon
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

MHA = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32")          # 1 KiB pages
MLA = KVLayout(num_layers=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float32", is_mla=True)  # 512 B
P8 = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, page_size=8, dtype="float32")           # 2 KiB
LAYOUTS = {"mha": MHA, "mla": MLA, "p8": P8}
BUDGET = 48 << 10


def _client(daemon, name, layout, num_pages, seed=None):
    pool = torch.zeros(layout.pool_shape(num_pages)) if seed is None else \
        torch.randn(layout.pool_shape(num_pages), generator=torch.Generator().manual_seed(seed))
    return daemon.client(pool, namespace=KeyNamespace(f"model-{name}", layout)), pool


def _tokens(layout, chain, num_pages):
    return [chain * 100_000 + i for i in range(num_pages * layout.page_size)]


def _pools(daemon) -> dict:
    return {d["layout"]: d for d in json.loads(daemon.stats()["pools"])}


def test_three_layouts_share_one_budget_bit_exact_and_fairly_evicted(tmp_path):
    with running_daemon(tmp_path, layout=None, args=["--host-pool-bytes", str(BUDGET)]) as daemon:
        # Three models of different layouts on one daemon: stores and loads bit-exact.
        for i, (name, layout) in enumerate(LAYOUTS.items()):
            writer, _ = _client(daemon, name, layout, 8, seed=i)
            assert writer.store(_tokens(layout, 0, 8), range(8)).num_new_pages == 8
            writer.close()
        for i, (name, layout) in enumerate(LAYOUTS.items()):
            reader, dst = _client(daemon, name, layout, 8)
            src = torch.randn(layout.pool_shape(8), generator=torch.Generator().manual_seed(i))
            hit = reader.lookup(_tokens(layout, 0, 8))
            assert hit.num_hit_pages == 8, name
            reader.load(hit, range(8)).wait_all()
            reader.release(hit)
            assert dst.numpy().tobytes() == src.numpy().tobytes(), name   # raw bytes, not floats
            reader.close()
        assert {d["slot_bytes"] for d in _pools(daemon).values()} == {512, 1024, 2048}
        # Fencing holds per segment: each tenant segment carries its slots' generations, and a
        # slot whose generation moved while it was leased fails the load (LoadError), never
        # silently. (Bumped here through the client's own mapping of its memfd, as the daemon
        # does when it hands a slot to a new writer.)
        reader, _ = _client(daemon, "mla", MLA, 8)
        hit = reader.lookup(_tokens(MLA, 0, 8))
        mapped = reader._link.pool
        slots = reader._leases[hit.lease_id].slots
        mapped.generations[slots[3]] += 1
        with pytest.raises(LoadError) as err:
            reader.load(hit, range(8)).wait_all()
        assert err.value.first_bad_page == 3
        mapped.generations[slots[3]] -= 1
        reader.release(hit)
        reader.close()

        # Now 28 of the 48 KiB are used (MLA 4, MHA 8, P8 16). The quiet two grow to 20 KiB
        # each (MLA 40 pages, P8 10 pages): the budget is full.
        clients = {name: _client(daemon, name, layout, 16, seed=1)[0]
                   for name, layout in LAYOUTS.items()}
        for chain in range(1, 5):
            assert clients["mla"].store(_tokens(MLA, chain, 8), range(8)).num_new_pages == 8
        assert clients["p8"].store(_tokens(P8, 1, 2), range(2)).num_new_pages == 2
        assert daemon.stats()["used_bytes"] == BUDGET
        # The busy one stores 64 KiB (more than the whole budget) in 8-page chains.
        for chain in range(1, 9):
            assert clients["mha"].store(_tokens(MHA, chain, 8), range(8)).num_new_pages == 8
        pools = _pools(daemon)
        used = {name: pools[layout.fingerprint()]["used_slots"] * layout.page_bytes
                for name, layout in LAYOUTS.items()}
        evicted = {name: pools[layout.fingerprint()]["evicted_budget"] for name, layout in LAYOUTS.items()}
        assert sum(used.values()) <= BUDGET
        # Max-min fair by bytes: each ends at a third of the budget, within one 2 KiB page.
        for name in LAYOUTS:
            assert abs(used[name] - BUDGET // 3) <= 2048, (used, evicted)
        # So the quiet ones gave up what they held above their share (4 KiB each: 8 MLA
        # pages, 2 P8 pages), and the busy one evicted its own pages for the rest.
        assert 6 <= evicted["mla"] <= 10 and 1 <= evicted["p8"] <= 3, evicted
        assert evicted["mha"] >= 72 - 16 - 2, evicted
        # What is left of the quiet ones still loads (their newest chains, LRU).
        reader, _ = _client(daemon, "mla", MLA, 8)
        assert reader.lookup(_tokens(MLA, 4, 8)).num_hit_pages == 8
        reader.close()
        for client in clients.values():
            client.close()
        daemon.check_integrity(quiescent=True)


def test_budget_larger_than_memory_is_refused():
    with pytest.raises(ConfigError, match="exceeds this machine's physical memory"):
        check_budget(2 << 40, physical=1 << 40)
    with pytest.raises(ConfigError, match="host_pool_bytes"):
        load_config(None, environ={"KVSTORE_HOST_POOL_BYTES": "1000T"})
    assert load_config(None, environ={"KVSTORE_HOST_POOL_BYTES": "1G"}).host_pool_bytes == 1 << 30
    assert default_pool_bytes(physical=16 << 30) == 4 << 30
    assert default_pool_bytes(physical=1 << 40) == 64 << 30
