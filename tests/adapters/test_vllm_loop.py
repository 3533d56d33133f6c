"""The kvstore connector inside vLLM 0.33.0's own loop (see ``vllm_loop``): real Scheduler,
connectors from KVConnectorFactory with the README's JSON, KV tensors from vLLM's
allocation code (MHA and MLA), every context byte checked in every step, outputs
compared with a run without cache."""

import pytest

pytest.importorskip("vllm.v1.core.sched.scheduler", reason="vLLM is not installed (scripts/setup_adapters.sh)")

import vllm_loop as vl  # noqa: E402
from adapters.vllm.keys import chain_keys  # noqa: E402

pytestmark = pytest.mark.vllm

P = vl.P


def prompt_of(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vl.VOCAB - 1) + 1 for i in range(n)]


def make_engine(tmp_path, request, *, is_mla=False, backend="FLASH_ATTN", num_blocks=64,
                layout=None, kernel_block_size=None, max_batched_tokens=256, **extra):
    extra = {"kvstore_url": "embedded", "kvstore_embedded_name": request.node.name,
             "kvstore_host_pool_pages": 256, **extra}
    vc = vl.vllm_config(vl.model_dir(tmp_path, is_mla), backend, extra, max_batched_tokens,
                        max_model_len=min(512, (num_blocks - 1) * P))
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
