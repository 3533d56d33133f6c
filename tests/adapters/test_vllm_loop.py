"""The kvstore connector inside vLLM 0.33.0's own loop (see ``vllm_loop``): real Scheduler,
connectors from KVConnectorFactory with the README's JSON, KV tensors from vLLM's
allocation code (MHA and MLA), every context byte checked in every step, outputs
compared with a run without cache."""

import pytest
import torch

from engine_imports import import_engine  # noqa: E402

import_engine("vllm.v1.core.sched.scheduler")   # skip without vLLM; under CI, fail

import vllm_loop as vl  # noqa: E402
from adapters.vllm.keys import chain_keys  # noqa: E402

pytestmark = pytest.mark.vllm

P = vl.P


def prompt_of(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vl.VOCAB - 1) + 1 for i in range(n)]


def make_engine(tmp_path, request, *, is_mla=False, backend="FLASH_ATTN", num_blocks=64,
                layout=None, kernel_block_size=None, max_batched_tokens=256, async_scheduling=False,
                **extra):
    extra = {"kvstore_url": "embedded", "kvstore_embedded_name": request.node.name,
             "kvstore_host_pool_pages": 256, **extra}
    vc = vl.vllm_config(vl.model_dir(tmp_path, is_mla), backend, extra, max_batched_tokens,
                        max_model_len=min(512, (num_blocks - 1) * P),
                        async_scheduling=async_scheduling)
    worker_cfg, sched_cfg, kv = vl.allocate(vc, backend, num_blocks, layout, kernel_block_size)
    engine = vl.Engine(vc, sched_cfg, vl.Runner(vc, worker_cfg, kv, backend))
    request.addfinalizer(engine.close)
    return engine


def run_and_check(engine, *reqs, max_tokens=3):
    prompts = {r.request_id: list(r.prompt_token_ids) for r in reqs}
    engine.add(*reqs)
    engine.run()
    for req_id, prompt in prompts.items():
        assert engine.outputs[req_id] == vl.truth(prompt, max_tokens), req_id


def loads_of(engine, req_id):
    return [(t.first_page, t.num_pages) for plan in engine.plans for t in plan.loads if t.req_id == req_id]


def saved_pages(engine, req_id):
    return sorted({p for plan in engine.plans for t in plan.saves if t.req_id == req_id
                   for p in range(t.first_page, t.num_pages)})


MHA_AND_MLA = [pytest.param(False, "FLASH_ATTN", id="mha-flash"),
               pytest.param(False, "CPU_ATTN", id="mha-cpu"),
               pytest.param(True, "TRITON_MLA", id="mla")]


@pytest.mark.parametrize("is_mla,backend", MHA_AND_MLA)
def test_no_hit_then_external_hit(tmp_path, request, is_mla, backend):
    eng = make_engine(tmp_path, request, is_mla=is_mla, backend=backend)
    prompt = prompt_of(1, 5 * P + 3)
    run_and_check(eng, vl.new_request("a", prompt))
    assert loads_of(eng, "a") == [] and saved_pages(eng, "a") == [0, 1, 2, 3, 4]
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt + [5, 6]))
    assert loads_of(eng, "b") == [(0, 5)]
    assert eng.worker.num_checked_tokens > 0


def test_local_prefix_cache_hit_plus_external_hit(tmp_path, request):
    """vLLM holds pages 0-1 itself, kvstore 0-3: only 2-3 load, into blocks after vLLM's."""
    eng = make_engine(tmp_path, request)
    prompt = prompt_of(2, 4 * P + 3)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("r", prompt[:2 * P + 1]))   # vLLM caches pages 0-1 again
    run_and_check(eng, vl.new_request("b", prompt + [9]))
    assert loads_of(eng, "b") == [(2, 4)]


def test_chunked_prefill_saves_every_page(tmp_path, request):
    eng = make_engine(tmp_path, request, max_batched_tokens=64)
    prompt = prompt_of(3, 197)                                       # 12 full pages + 5
    run_and_check(eng, vl.new_request("a", prompt))
    assert saved_pages(eng, "a") == list(range(12))
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt))
    assert loads_of(eng, "b") == [(0, 12)]


def test_the_worker_reports_prefill_steps_to_the_schedulers_cost_model(tmp_path, request):
    """Steps of one prompt chunk are timed on the worker and reach the cache whose auto
    policy the scheduler's lookups follow (the engine's prefill rate)."""
    from adapters.vllm.prefill_timing import PrefillSample, merge_samples

    eng = make_engine(tmp_path, request, max_batched_tokens=64)
    cost = eng.connector._cache._cost_model()
    assert not cost.prefill.is_known
    run_and_check(eng, vl.new_request("a", prompt_of(21, 197)))       # 4 chunks of 64, 64, 64, 5
    assert [(c.num_tokens, c.num_cached) for plan in eng.plans for c in plan.prefills] == [
        (64, 0), (64, 64), (64, 128), (5, 192)]
    assert cost.prefill._fit.num_samples == 4
    rate = cost.rates()["prefill_tokens_per_s"]
    assert rate > 0
    run_and_check(eng, vl.new_request("b", prompt_of(22, 3 * P)))
    assert cost.prefill._fit.num_samples == 5
    # Two TP ranks' samples of one step: one sample, the slower rank's time.
    a, b = PrefillSample("r", 64, 0, 0.5), PrefillSample("r", 64, 0, 0.7)
    assert merge_samples([a], [b]) == [b]


def test_preempted_request_resumes_exactly(tmp_path, request):
    """Too few blocks for both decodes: vLLM preempts one, frees its blocks and resumes
    it later (a new lookup, new blocks, resumed_req_ids)."""
    eng = make_engine(tmp_path, request, num_blocks=13)
    a, b = prompt_of(4, 5 * P + 1), prompt_of(5, 5 * P + 1)
    run_and_check(eng, vl.new_request("a", a, max_tokens=40), vl.new_request("b", b, max_tokens=40),
                  max_tokens=40)
    assert eng.num_preemptions > 0
    # The preempted request came back with vLLM's surviving blocks as a local hit and
    # the rest of its prompt loaded from kvstore into its new blocks.
    assert any(first > 0 for first, _ in loads_of(eng, "a") + loads_of(eng, "b"))


def test_page_lost_between_lookup_and_load_is_recomputed(tmp_path, request):
    eng = make_engine(tmp_path, request)
    prompt = prompt_of(6, 5 * P + 3)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    keys = chain_keys(eng.worker.connector.namespace.digest(), prompt[:5 * P], P)
    core = eng.worker.connector._cache.embedded.core

    eng.add(vl.new_request("b", prompt))
    eng.step(before_execute=lambda: core.host.discard(keys[2:]))      # pages 2-4 leave L2
    assert loads_of(eng, "b") == [(0, 5)]
    eng.run()
    assert eng.outputs["b"] == vl.truth(prompt, 3)
    assert saved_pages(eng, "b") == [2, 3, 4]                          # the recompute stored them
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("c", prompt))
    assert loads_of(eng, "c") == [(0, 5)]


def test_slot_reused_during_the_load_is_fenced_and_recomputed(tmp_path, request):
    """The failed-load contract through the real fenced load: after the worker leased
    the pages, the slot of page 1 changes owner (its generation moves on, as when the
    daemon hands a silent client's slot to another writer). The load's wait raises
    LoadError from page 1; the connector reports that block and the later ones, aborts
    the step's saves over them, and vLLM recomputes: the output stays exact."""
    eng = make_engine(tmp_path, request)
    prompt = prompt_of(7, 4 * P + 3)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    conn = eng.worker.connector
    core = conn._cache.embedded.core
    (slot,) = core.slots_of(chain_keys(conn.namespace.digest(), prompt[:2 * P], P)[1:2])

    def reuse_slot():
        core.pool.generations[slot] += 1
        eng.worker.after_start_load = None

    eng.worker.after_start_load = reuse_slot
    run_and_check(eng, vl.new_request("b", prompt))
    assert loads_of(eng, "b") == [(0, 4)]
    assert saved_pages(eng, "b") == [1, 2, 3]                          # recomputed, stored again


def test_two_requests_sharing_a_prefix_in_one_step(tmp_path, request):
    eng = make_engine(tmp_path, request)
    prefix = prompt_of(8, 3 * P)
    run_and_check(eng, vl.new_request("a", prefix + [1, 2]))
    eng.forget_local_prefix_cache()
    b, c = vl.new_request("b", prefix + [5, 6, 7]), vl.new_request("c", prefix + [8, 9])
    eng.add(b, c)
    first = eng.step()
    assert {r.req_id for r in first.scheduled_new_reqs} == {"b", "c"}
    eng.run()
    assert eng.outputs["b"] == vl.truth(prefix + [5, 6, 7], 3)
    assert eng.outputs["c"] == vl.truth(prefix + [8, 9], 3)
    assert (0, 3) in loads_of(eng, "b") + loads_of(eng, "c")


@pytest.mark.parametrize("layout,kernel", [("BLHNC", None), ("LBHNC", 8)])
def test_other_kv_layouts_and_kernel_blocks(tmp_path, request, layout, kernel):
    """Block-outermost packing, and blocks split into kernel blocks of 8 tokens."""
    eng = make_engine(tmp_path, request, layout=layout, kernel_block_size=kernel)
    view = next(iter(eng.worker.kv.values()))
    assert view.shape[2] == (kernel or P)
    prompt = prompt_of(9, 3 * P + 1)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt))
    assert loads_of(eng, "b") == [(0, 3)]


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "CPU_ATTN"])
def test_slots_hold_k_and_v_in_kvstore_order(tmp_path, request, backend):
    """A stored page is [layer][k|v][token][head][dim] whatever the backend's encoding, so
    other kvstore clients of the same model read the same K and V."""
    eng = make_engine(tmp_path, request, backend=backend)
    prompt = prompt_of(10, P + 1)
    run_and_check(eng, vl.new_request("a", prompt))
    conn = eng.worker.connector
    lease = conn._cache.lookup_keys(chain_keys(conn.namespace.digest(), prompt[:P], P))
    slot = conn._cache.host_tensor[lease.slots[0]]                     # [L, 2, P, H, D]
    hashes = vl.prefix_hashes(prompt)
    for layer in range(slot.shape[0]):
        for pos in range(P):
            for which in (0, 1):
                want = vl.expected_kv(hashes[pos], layer, tuple(slot.shape[3:]), which)
                assert torch.equal(slot[layer, which, pos], want)
    conn._cache.release_keys(lease)


def test_multimodal_items_change_the_keys():
    from adapters.vllm.plan import MMSpan

    tokens, seed = [7] * (3 * P), b"\x00" * 16
    plain = chain_keys(seed, tokens, P)
    cat = chain_keys(seed, tokens, P, [MMSpan(P + 2, 4, "cat")])
    dog = chain_keys(seed, tokens, P, [MMSpan(P + 2, 4, "dog")])
    assert cat[0] == plain[0] == dog[0]                               # before the image
    assert len({cat[1], dog[1], plain[1]}) == 3 and cat[2] != dog[2]  # at it and after


def test_an_image_behind_equal_placeholders_is_not_a_hit(tmp_path, request):
    """vLLM's scheduler-side connector with real multimodal Requests: pages up to the
    image hit, the page holding it and every later one only for the same image."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    def with_image(req_id, prompt, ident):
        feature = MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                        mm_position=PlaceholderRange(offset=P + 3, length=8))
        return vl.new_request(req_id, prompt, mm_features=[feature])

    eng = make_engine(tmp_path, request)
    prompt = prompt_of(15, 3 * P + 1)
    conn = eng.connector
    # Store the pages as a request with image "cat" would (the text model cannot run one).
    cat = with_image("cat", prompt, "cat")
    keys = conn._keys(conn._planner._transfer(cat, 3 * P, (), 0))
    conn._cache.store_keys(keys, lambda positions, slots: None)
    assert conn.get_num_new_matched_tokens(with_image("cat2", prompt, "cat"), 0) == (3 * P, False)
    assert conn.get_num_new_matched_tokens(with_image("dog", prompt, "dog"), 0) == (P, False)
    assert conn.get_num_new_matched_tokens(vl.new_request("text", prompt), 0) == (P, False)


def test_connector_asks_for_piecewise_cuda_graphs():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    cls = KVConnectorFactory.get_connector_class(vl.kv_transfer_config({}))
    assert cls.requires_piecewise_for_cudagraph({}) is True


def test_unknown_backend_and_quantized_cache_are_refused(tmp_path, request):
    from adapters.vllm.kv_views import check_spec, kv_split_of
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    with pytest.raises(ValueError, match="ROCM_ATTN.*--attention-backend"):
        kv_split_of("ROCM_ATTN", is_mla=False)
    eng = make_engine(tmp_path, request)
    spec = FullAttentionSpec(block_size=P, num_kv_heads=2, head_size=16, dtype=torch.float32,
                             kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    with pytest.raises(ValueError, match="quantized"):
        check_spec(spec, eng.worker.connector.layout)
    with pytest.raises(ValueError, match="registered 1 KV layers"):
        eng.worker.connector.register_kv_caches(dict(list(eng.worker.kv.items())[:1]))


def test_salted_requests_do_not_share(tmp_path, request):
    eng = make_engine(tmp_path, request)
    prompt = prompt_of(11, 2 * P + 1)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt, cache_salt="tenant-2"))
    assert loads_of(eng, "b") == []


def test_ask_again_while_the_lookup_runs(tmp_path, request):
    eng = make_engine(tmp_path, request, kvstore_async_lookup=True)
    prompt = prompt_of(12, 2 * P + 1)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt))
    assert loads_of(eng, "b") == [(0, 2)]


# ---- daemon mode: a `kvstore serve` process ------------------------------------------------
def start_daemon(tmp_path, request, is_mla):
    from controller.daemon.launch import wait_until_serving
    from daemon_proc import DaemonProcess
    from kvstore.layout import KVLayout

    layout = (KVLayout(num_layers=3, num_kv_heads=1, head_dim=40, page_size=P, dtype="float32",
                       is_mla=True) if is_mla else
              KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, page_size=P, dtype="float32"))
    daemon = DaemonProcess(tmp_path, layout=layout, host_pages=128,
                           args=["--layout-is-mla", "true"] if is_mla else []).start(wait=False)
    request.addfinalizer(daemon.stop)
    # Two cores shared with vLLM imports: the daemon may need more than the usual 30 s.
    wait_until_serving(daemon.address, daemon.proc, timeout_s=180)
    return daemon


@pytest.mark.parametrize("is_mla,backend", [MHA_AND_MLA[0], MHA_AND_MLA[2]])
def test_daemon_mode_both_roles_in_one_process(tmp_path, request, is_mla, backend):
    daemon = start_daemon(tmp_path, request, is_mla)
    eng = make_engine(tmp_path, request, is_mla=is_mla, backend=backend, kvstore_url=daemon.address)
    prompt = prompt_of(13, 4 * P + 2)
    run_and_check(eng, vl.new_request("a", prompt))
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt))
    assert loads_of(eng, "b") == [(0, 4)]
    eng.close()
    daemon.check_integrity(quiescent=True)


def test_daemon_mode_scheduler_and_worker_in_two_processes(tmp_path, request):
    """vLLM's split: the scheduler (and its connector) here, the worker connector and the
    KV tensors in a spawned process; scheduler outputs cross a pipe, pages the daemon."""
    from vllm_worker_proc import RemoteWorker

    daemon = start_daemon(tmp_path, request, is_mla=False)
    extra = {"kvstore_url": daemon.address}
    model, num_blocks = vl.model_dir(tmp_path, False), 64
    worker = RemoteWorker(model=model, backend="FLASH_ATTN", extra=extra, max_batched_tokens=64,
                          max_model_len=512, num_blocks=num_blocks)
    vc = vl.vllm_config(model, "FLASH_ATTN", extra, 64, 512)
    _, sched_cfg, _ = vl.allocate(vc, "FLASH_ATTN", num_blocks)
    eng = vl.Engine(vc, sched_cfg, worker)
    request.addfinalizer(eng.close)
    prompt = prompt_of(14, 6 * P + 5)                                  # two prefill chunks
    cost = eng.connector._cache._cost_model()   # the scheduler side's: its lookups choose
    assert cost.rates()["prefill_tokens_per_s"] is None
    run_and_check(eng, vl.new_request("a", prompt))
    # The worker process timed its prefill steps; they came back through vLLM's output.
    assert cost.prefill._fit.num_samples == 2 and cost.rates()["prefill_tokens_per_s"] > 0
    eng.forget_local_prefix_cache()
    run_and_check(eng, vl.new_request("b", prompt + [3]))
    assert loads_of(eng, "b") == [(0, 6)]
    eng.close()
    daemon.check_integrity(quiescent=True)


def test_the_fail_policy_is_warned_about(tmp_path, request, caplog):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    extra = {"kvstore_url": "embedded", "kvstore_embedded_name": request.node.name}
    vc = vl.vllm_config(vl.model_dir(tmp_path, False), "FLASH_ATTN", extra)
    vc.kv_transfer_config.kv_load_failure_policy = "fail"
    with caplog.at_level("WARNING", logger="adapters.vllm.connector"):
        conn = KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, None)
    conn.shutdown()
    assert '"kv_load_failure_policy": "recompute"' in caplog.text


def test_async_scheduling_two_steps_in_flight(tmp_path, request):
    """vLLM's default when serving: AsyncScheduler with a batch queue, so step k+1 is
    planned (and its connector metadata built) before step k's output is fed back."""
    eng = make_engine(tmp_path, request, max_batched_tokens=64, async_scheduling=True)
    assert type(eng.scheduler).__name__ == "AsyncScheduler"
    prompt = prompt_of(16, 6 * P + 5)

    def run(*reqs, max_tokens=4):
        eng.add(*reqs)
        eng.run_pipelined()
        for r in reqs:
            assert eng.outputs[r.request_id] == vl.truth(list(r.prompt_token_ids), max_tokens)

    run(vl.new_request("a", prompt, max_tokens=4))
    assert saved_pages(eng, "a") == list(range(6))
    eng.forget_local_prefix_cache()
    run(vl.new_request("b", prompt + [4], max_tokens=4), vl.new_request("c", prompt_of(17, 40), max_tokens=4))
    assert loads_of(eng, "b") == [(0, 6)]
