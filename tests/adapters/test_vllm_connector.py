"""KVStoreConnector driven as vLLM 0.33.0 drives it, with vLLM's own objects: the
connector built by KVConnectorFactory from a VllmConfig's KVTransferConfig, one
instance per role; Request, KVCacheBlocks, NewRequestData and SchedulerOutput
from vLLM; per-layer KV caches as the FlashAttention (MHA) and MLA backends shape
them. A step is: scheduler calls, bind metadata, start_load_kv, then per layer
wait_for_layer_load / (attention) / save_kv_layer, then wait_for_save."""

import pytest
import torch

pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base",
                    reason="vLLM is not installed (scripts/setup_adapters.sh)")
from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

pytestmark = pytest.mark.vllm

P, L, H, D, NUM_BLOCKS = 4, 3, 2, 8, 16


def vllm_config(name, is_mla=False, **extra):
    layout = {"num_layers": L, "num_kv_heads": 1 if is_mla else H, "head_dim": D,
              "dtype": "float32", "is_mla": is_mla}
    kv = KVTransferConfig(kv_connector="KVStoreConnector", kv_role="kv_both",
                          kv_connector_module_path="adapters.vllm.connector",
                          kv_connector_extra_config={"kvstore_url": "embedded",
                                                     "kvstore_embedded_name": name,
                                                     "kvstore_model_id": "tiny-llama",
                                                     "kvstore_layout": layout, **extra})
    return VllmConfig(device_config=DeviceConfig(device="cpu"), cache_config=CacheConfig(block_size=P),
                      kv_transfer_config=kv)


class Engine:
    """One scheduler-side and one worker-side connector with a worker's KV caches."""

    def __init__(self, request, is_mla=False, **extra):
        config = vllm_config(request.node.name, is_mla, **extra)
        self.scheduler = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, None)
        self.worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, None)
        shape = (NUM_BLOCKS, P, D) if is_mla else (2, NUM_BLOCKS, P, H, D)
        self.kv = {f"model.layers.{i}.self_attn.attn": torch.zeros(shape) for i in range(L)}
        self.worker.register_kv_caches(self.kv)
        request.addfinalizer(self.close)

    def close(self):
        self.scheduler.shutdown()
        self.worker.shutdown()

    def block(self, name, block):
        kv = self.kv[name]
        return kv[block] if kv.dim() == 3 else kv[:, block]

    def schedule(self, req, blocks, num_tokens):
        """The scheduler's calls for a new request; returns the step's SchedulerOutput."""
        hit, is_async = self.scheduler.get_num_new_matched_tokens(req, req.num_computed_tokens)
        while hit is None:  # "ask again": a lookup is running
            hit, is_async = self.scheduler.get_num_new_matched_tokens(req, req.num_computed_tokens)
        assert is_async is False
        kv_blocks = KVCacheBlocks((tuple(KVCacheBlock(b) for b in blocks),))
        self.scheduler.update_state_after_alloc(req, kv_blocks, hit)
        req.num_computed_tokens += hit
        new = NewRequestData.from_request(req, (list(blocks),))
        out = SchedulerOutput(scheduled_new_reqs=[new],
                              scheduled_cached_reqs=CachedRequestData.make_empty(),
                              num_scheduled_tokens={req.request_id: num_tokens - hit},
                              total_num_scheduled_tokens=num_tokens - hit,
                              scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                              num_common_prefix_blocks=[0], finished_req_ids=set(),
                              free_encoder_mm_hashes=[])
        return hit, out

    def run_step(self, out, compute=None):
        """The worker's calls for one forward pass; ``compute(layer_name)`` is the attention."""
        meta = self.scheduler.build_connector_meta(out)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        loaded = {}
        for name, kv in self.kv.items():
            self.worker.wait_for_layer_load(name)
            loaded[name] = kv.clone()
            if compute is not None:
                compute(name)
            self.worker.save_kv_layer(name, kv, None)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        return meta, loaded


def new_request(req_id, tokens):
    return Request(req_id, list(tokens), SamplingParams(max_tokens=1), None)


def fill(engine, blocks, seed):
    gen = torch.Generator().manual_seed(seed)

    def compute(name):
        for b in blocks:
            engine.block(name, b).copy_(torch.randn(engine.block(name, b).shape, generator=gen))
    return compute


@pytest.mark.parametrize("is_mla", [False, True])
def test_second_request_loads_the_first_ones_pages_layer_by_layer(request, is_mla):
    eng = Engine(request, is_mla)
    prompt = list(range(100, 118))                      # 18 tokens: 4 full pages + 2
    hit, out = eng.schedule(new_request("a", prompt), [0, 1, 2, 3, 4], len(prompt))
    assert hit == 0
    meta, _ = eng.run_step(out, fill(eng, [0, 1, 2, 3, 4], seed=1))
    assert [(t.first_page, t.num_pages) for t in meta.plan.saves] == [(0, 4)]
    # Same prefix, longer prompt: 4 cached pages (16 tokens) load into blocks 8..11.
    req_b = new_request("b", prompt + [7, 7, 7])
    hit, out = eng.schedule(req_b, [8, 9, 10, 11, 12, 13], len(prompt) + 3)
    assert hit == 16
    meta, loaded = eng.run_step(out)
    assert [(t.first_page, t.num_pages) for t in meta.plan.loads] == [(0, 4)]
    for name in eng.kv:
        for src, dst in zip([0, 1, 2, 3], [8, 9, 10, 11]):
            assert torch.equal(loaded[name][dst] if is_mla else loaded[name][:, dst],
                               eng.block(name, src))
    assert eng.worker.get_block_ids_with_load_errors() == set()


def test_ask_again_while_the_lookup_runs(request):
    eng = Engine(request, kvstore_async_lookup=True)
    prompt = list(range(9))
    _, out = eng.schedule(new_request("a", prompt), [0, 1, 2], 9)
    eng.run_step(out, fill(eng, [0, 1, 2], seed=2))
    req = new_request("b", prompt)
    first = eng.scheduler.get_num_new_matched_tokens(req, 0)
    assert first == (None, False)
    hit, _ = eng.schedule(req, [5, 6, 7], 9)
    assert hit == 8


def test_lost_pages_are_reported_as_load_errors(request):
    eng = Engine(request)
    prompt = list(range(13))
    _, out = eng.schedule(new_request("a", prompt), [0, 1, 2, 3], 13)
    eng.run_step(out, fill(eng, [0, 1, 2, 3], seed=3))
    hit, out = eng.schedule(new_request("b", prompt), [4, 5, 6, 7], 13)
    assert hit == 12
    # Pages 1 and 2 leave the cache between the scheduler's answer and the load.
    keys = eng.worker._keys(None, prompt[:12])
    eng.worker._cache.embedded.core.host.discard(keys[1:])
    eng.run_step(out)
    assert eng.worker.get_block_ids_with_load_errors() == {5, 6}
    assert torch.equal(eng.block("model.layers.0.self_attn.attn", 4),
                       eng.block("model.layers.0.self_attn.attn", 0))


def test_salted_and_lora_requests_do_not_share(request):
    eng = Engine(request)
    prompt = list(range(9))
    _, out = eng.schedule(new_request("a", prompt), [0, 1, 2], 9)
    eng.run_step(out, fill(eng, [0, 1, 2], seed=4))
    salted = Request("b", prompt, SamplingParams(max_tokens=1), None, cache_salt="tenant-2")
    assert eng.scheduler.get_num_new_matched_tokens(salted, 0) == (0, False)
    assert eng.scheduler.get_num_new_matched_tokens(new_request("c", prompt), 0) == (8, False)


def test_two_engines_share_pages_through_a_live_daemon(request, tmp_path):
    """Daemon mode: one engine computes and saves, a second one loads, layer by layer."""
    from daemon_proc import DaemonProcess
    from kvstore.layout import KVLayout

    layout = KVLayout(num_layers=L, num_kv_heads=H, head_dim=D, page_size=P, dtype="float32")
    daemon = DaemonProcess(tmp_path, layout=layout, host_pages=32).start()
    request.addfinalizer(daemon.stop)
    first = Engine(request, kvstore_url=daemon.address)
    second = Engine(request, kvstore_url=daemon.address)
    prompt = list(range(9))                             # two full pages and one token
    _, out = first.schedule(new_request("a", prompt), [0, 1, 2], 9)
    first.run_step(out, fill(first, [0, 1, 2], seed=5))
    hit, out = second.schedule(new_request("b", prompt), [4, 5, 6], 9)
    assert hit == 8
    second.run_step(out)
    for name in first.kv:
        for a, b in [(0, 4), (1, 5)]:
            assert torch.equal(second.block(name, b), first.block(name, a))
    first.close()
    second.close()
    daemon.check_integrity(quiescent=True)
