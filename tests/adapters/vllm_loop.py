"""vLLM 0.33.0's own engine loop on CPU around the kvstore connector, without weights.

Everything but the model is vLLM's: ``VllmConfig`` from a tiny local ``config.json``
(no hub, no weights), the KV cache specs, layout resolution, ``get_kv_cache_configs``
and ``allocate_kv_cache`` (the per-layer views a GPU worker registers), the real
``Scheduler`` (which makes its connector with ``KVConnectorFactory`` from the
README's ``--kv-transfer-config``), the worker connector from the same factory, and
``Scheduler.update_from_output``. ``Runner`` stands in for the model runner only: it
follows the connector call order of ``KVConnectorModelRunnerMixin`` and, as
"attention", writes deterministic KV that depends on the whole token prefix,
position and layer, through the attention backend's own reading of the tensor.
Before writing, it checks every context token's K and V in every layer, so every
byte loaded from kvstore is checked. A request whose context is wrong must have a
reported load error (vLLM then drops its output and recomputes); otherwise the
runner raises ``SilentCorruption``. Sampled tokens are a function of the context,
wrong when the context is wrong, so outputs prove the run exact.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm import SamplingParams
from vllm.config import (AttentionConfig, CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                         SchedulerConfig, VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
from vllm.v1.core.kv_cache_utils import (generate_scheduler_kv_cache_config, get_request_block_hasher,
                                         init_none_hash)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache, copy_kv_cache_blocks_inplace

P = 16                     # vLLM block size = kvstore page size
VOCAB = 1000
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "num_hidden_layers": 3, "vocab_size": VOCAB,
         "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
DEEPSEEK = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
            "first_k_dense_replace": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
            "num_hidden_layers": 3, "vocab_size": VOCAB, "kv_lora_rank": 32, "q_lora_rank": None,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


class SilentCorruption(AssertionError):
    """A request computed over wrong KV and no load error covered it."""


def model_dir(root: Path, is_mla: bool) -> str:
    """A local model directory with only a config.json (vLLM never loads weights here)."""
    path = root / ("tiny-mla" if is_mla else "tiny-llama")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(DEEPSEEK if is_mla else LLAMA))
    return str(path)


def kv_transfer_config(extra: dict) -> KVTransferConfig:
    """The README's --kv-transfer-config, with the load-failure policy it tells users to set."""
    return KVTransferConfig(**json.loads(json.dumps({
        "kv_connector": "KVStoreConnector", "kv_connector_module_path": "adapters.vllm.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra})))


def vllm_config(model: str, backend: str, extra: dict, max_batched_tokens: int = 256,
                max_model_len: int = 512, async_scheduling: bool = False) -> VllmConfig:
    mc = ModelConfig(model=model, tokenizer=None, skip_tokenizer_init=True, dtype="float32",
                     max_model_len=max_model_len)
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_batched_tokens,
                         max_model_len=max_model_len, enable_chunked_prefill=True,
                         is_encoder_decoder=False,
                         # False: vLLM's Scheduler, one step in flight (Engine.run);
                         # True: AsyncScheduler, two steps in flight (Engine.run_pipelined).
                         async_scheduling=async_scheduling)
    return VllmConfig(model_config=mc, scheduler_config=sc,
                      cache_config=CacheConfig(block_size=P, enable_prefix_caching=True),
                      kv_transfer_config=kv_transfer_config(extra), device_config=DeviceConfig("cpu"),
                      attention_config=AttentionConfig(backend=AttentionBackendEnum[backend]))


def allocate(vc: VllmConfig, backend: str, num_blocks: int, layout: str | None = None,
             kernel_block_size: int | None = None):
    """vLLM's KV cache planning and allocation for the model's attention layers:
    (worker KVCacheConfig, scheduler KVCacheConfig, {layer name: [B, H, N, C] view})."""
    mc = vc.model_config
    Spec = MLAAttentionSpec if mc.use_mla else FullAttentionSpec
    spec = Spec(block_size=P, num_kv_heads=mc.get_num_kv_heads(vc.parallel_config),
                head_size=mc.get_head_size(), dtype=torch.float32)
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in range(mc.get_num_layers(vc.parallel_config))}
    if layout is not None:
        vc.cache_config.kv_cache_layout = layout
    supported = AttentionBackendEnum[backend].get_class().supported_kv_cache_layouts()
    names = [m.name for m in supported] if supported else ["LBNHC", "LBHNC"]
    resolved = resolve_kv_cache_layout(vc, [names], list(specs.values()))
    groups = get_global_kv_cache_groups(vc, [specs])
    (worker_cfg,) = get_kv_cache_configs(vc, [specs], [spec.page_size_bytes * len(specs) * num_blocks],
                                         groups)
    worker_cfg.kv_cache_layout = vc.cache_config.kv_cache_layout
    sched_cfg = generate_scheduler_kv_cache_config([worker_cfg])
    vc.cache_config.num_gpu_blocks = sched_cfg.num_blocks
    kernel = [kernel_block_size] if kernel_block_size else None
    return worker_cfg, sched_cfg, allocate_kv_cache(worker_cfg, torch.device("cpu"), resolved, kernel)


def new_request(req_id: str, prompt: list[int], max_tokens: int = 3, **kwargs) -> Request:
    init_none_hash(sha256)
    return Request(req_id, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   None, block_hasher=get_request_block_hasher(P, sha256), **kwargs)


# ---- the deterministic "model" ----------------------------------------------------------
def prefix_hashes(tokens: list[int]) -> list[int]:
    out, h = [], 17
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
        out.append(h)
    return out


def next_token(tokens: list[int]) -> int:
    return (prefix_hashes(tokens)[-1] * 7 + 13) % (VOCAB - 1) + 1


class TokenKV:
    """K and V (or the MLA latent) of one token as the attention backend reads the tensor."""

    def __init__(self, kv: torch.Tensor, backend: str, is_mla: bool, num_heads: int) -> None:
        b, h, n, c = kv.shape
        self.n, self.is_mla = n, is_mla
        if is_mla:
            self.parts = (kv[:, 0],)                                   # [B, N, C]
        elif backend == "CPU_ATTN":                                    # cpu_attn.py: rows
            k, v = kv.view(b, h, 2 * n, c // 2).chunk(2, dim=2)
            self.parts = (k.transpose(1, 2), v.transpose(1, 2))         # [B, N, H, D]
        else:                                                          # flash_attn.py: content
            self.parts = kv.transpose(1, 2).split(c // 2, dim=-1)       # [B, N, H, D]

    def at(self, block: int, offset: int) -> list[torch.Tensor]:
        kb, n = block * (P // self.n) + offset // self.n, offset % self.n
        return [part[kb, n] for part in self.parts]


def expected_kv(prefix_hash: int, layer: int, shape: tuple[int, ...], which: int) -> torch.Tensor:
    base = (prefix_hash * 31 + layer * 7919 + which * 104_729) % 4_000_000
    grid = torch.arange(int(torch.tensor(shape).prod())).reshape(shape) * 3
    return (base + grid).to(torch.float32)


@dataclass
class _ReqState:
    block_ids: list[int] = field(default_factory=list)


class Runner:
    """The model-runner stand-in (see module doc). ``kv``: vLLM's registered views."""

    def __init__(self, vc: VllmConfig, worker_cfg: Any, kv: dict[str, torch.Tensor], backend: str) -> None:
        self.vc, self.worker_cfg, self.kv = vc, worker_cfg, kv
        self.connector = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, worker_cfg)
        self.connector.register_kv_caches(kv)
        is_mla = vc.model_config.use_mla
        heads = vc.model_config.get_num_kv_heads(vc.parallel_config)
        self.token_kv = {name: TokenKV(t, backend, is_mla, heads) for name, t in kv.items()}
        self.reqs: dict[str, _ReqState] = {}
        self.num_checked_tokens = 0
        self.after_start_load: Any = None

    def close(self) -> None:
        self.connector.shutdown()

    def execute(self, out: Any, tokens_of: dict[str, list[int]]) -> ModelRunnerOutput:
        """One step: vLLM's update of states, connector calls around a layer loop."""
        scheduled = self._update_states(out)
        c = self.connector
        c.bind_connector_metadata(out.kv_connector_metadata)
        if out.has_sync_kv_loads:
            c.start_load_kv(None)
            if self.after_start_load is not None:     # a test's event during the load
                self.after_start_load()
        bad_pos: dict[str, int] = {}
        for layer, name in enumerate(self.kv):
            c.wait_for_layer_load(name)
            for req_id, (start, n) in scheduled.items():
                self._check_context(req_id, tokens_of[req_id], start, layer, name, bad_pos)
                self._write(req_id, tokens_of[req_id], start, n, layer, name)
            c.save_kv_layer(name, self.kv[name], None)
        if not out.has_sync_kv_loads:
            c.start_load_kv(None)
        c.wait_for_save()
        c.get_finished(out.finished_req_ids)
        errors = c.get_block_ids_with_load_errors()
        worker_meta = c.build_connector_worker_meta()   # worker -> scheduler, as the mixin does
        c.clear_connector_metadata()
        self._require_reported(bad_pos, errors)
        return self._output(scheduled, tokens_of, bad_pos, errors, worker_meta)

    def _update_states(self, out: Any) -> dict[str, tuple[int, int]]:
        """Block tables from the scheduler output (gpu_model_runner's rules); zero new blocks
        and apply block copies first, as vLLM does before the forward."""
        for req_id in out.finished_req_ids:
            self.reqs.pop(req_id, None)
        if out.new_block_ids_to_zero:
            for t in self.kv.values():
                for b in out.new_block_ids_to_zero:
                    t[b * (P // t.shape[2]):(b + 1) * (P // t.shape[2])] = 0
        if out.kv_cache_block_copies:
            copy_kv_cache_blocks_inplace(self.kv, self.worker_cfg.num_blocks, out.kv_cache_block_copies)
        scheduled = {}
        for new in out.scheduled_new_reqs:
            self.reqs[new.req_id] = _ReqState(list(new.block_ids[0]))
            scheduled[new.req_id] = (new.num_computed_tokens, out.num_scheduled_tokens[new.req_id])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.reqs[req_id] = _ReqState(list(blocks[0]))
            elif blocks:
                self.reqs[req_id].block_ids.extend(blocks[0])
            scheduled[req_id] = (cached.num_computed_tokens[i], out.num_scheduled_tokens[req_id])
        return scheduled

    def _check_context(self, req_id, tokens, start, layer, name, bad_pos) -> None:
        blocks, hashes = self.reqs[req_id].block_ids, prefix_hashes(tokens[:start])
        for pos in range(start):
            got = self.token_kv[name].at(blocks[pos // P], pos % P)
            want = [expected_kv(hashes[pos], layer, g.shape, w) for w, g in enumerate(got)]
            if not all(torch.equal(g, w) for g, w in zip(got, want)):
                bad_pos[req_id] = min(bad_pos.get(req_id, pos), pos)
                return
            self.num_checked_tokens += 1

    def _write(self, req_id, tokens, start, n, layer, name) -> None:
        blocks, hashes = self.reqs[req_id].block_ids, prefix_hashes(tokens[:start + n])
        for pos in range(start, start + n):
            for w, part in enumerate(self.token_kv[name].at(blocks[pos // P], pos % P)):
                part.copy_(expected_kv(hashes[pos], layer, part.shape, w))

    def _require_reported(self, bad_pos: dict[str, int], errors: set[int]) -> None:
        for req_id, pos in bad_pos.items():
            if self.reqs[req_id].block_ids[pos // P] not in errors:
                raise SilentCorruption(f"request {req_id}: KV at position {pos} is wrong and no load "
                                       f"error reports its block (reported: {sorted(errors)})")

    def _output(self, scheduled, tokens_of, bad_pos, errors, worker_meta=None) -> ModelRunnerOutput:
        req_ids = list(scheduled)
        sampled = []
        for req_id in req_ids:
            start, n = scheduled[req_id]
            tokens = tokens_of[req_id]
            if start + n < len(tokens):
                sampled.append([])                    # a prefill chunk samples nothing
                continue
            token = next_token(tokens[:start + n])
            sampled.append([token if req_id not in bad_pos else (token % (VOCAB - 1)) + 1])
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={},
                                 pooler_output=None,
                                 kv_connector_output=KVConnectorOutput(invalid_block_ids=errors,
                                                                       kv_connector_worker_meta=worker_meta))


class Engine:
    """Scheduler + a worker (this process's ``Runner`` or a remote one), stepped by hand."""

    def __init__(self, vc: VllmConfig, sched_cfg: Any, worker: Any) -> None:
        self.vc, self.worker = vc, worker
        cls = AsyncScheduler if vc.scheduler_config.async_scheduling else Scheduler
        self.scheduler = cls(vllm_config=vc, kv_cache_config=sched_cfg, log_stats=False,
                             structured_output_manager=StructuredOutputManager(vc), block_size=P)
        self.outputs: dict[str, list[int]] = {}
        self.num_preemptions = 0
        self.plans: list[Any] = []

    @property
    def connector(self) -> Any:
        return self.scheduler.connector

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.outputs[r.request_id] = []
            self.scheduler.add_request(r)

    def step(self, before_execute: Any = None) -> Any:
        """One engine step; ``before_execute()`` runs between scheduling and the forward
        (where a page can leave the cache after the scheduler counted it)."""
        out = self.scheduler.schedule()
        self.plans.append(out.kv_connector_metadata.plan)
        if before_execute is not None:
            before_execute()
        tokens_of = {rid: list(r.all_token_ids) for rid, r in self.scheduler.requests.items()}
        result = self.worker.execute(out, tokens_of)
        for eco in self.scheduler.update_from_output(out, result).values():
            for o in eco.outputs:
                self.outputs[o.request_id].extend(o.new_token_ids)
        self.num_preemptions = max(self.num_preemptions, max(
            (r.num_preemptions for r in self.scheduler.requests.values()), default=0))
        return out

    def run_pipelined(self, depth: int = 2, max_steps: int = 400) -> None:
        """vLLM's engine core with a batch queue (``step_with_batch_queue``): the next step
        is scheduled before the previous one's output is fed back; the runner continues
        from the tokens it sampled in steps still in the queue, as a GPU runner does."""
        queue: deque = deque()
        for _ in range(max_steps):
            if self.scheduler.has_requests():
                out = self.scheduler.schedule()
                self.plans.append(out.kv_connector_metadata.plan)
                tokens_of = {rid: list(r.all_token_ids) for rid, r in self.scheduler.requests.items()}
                for _, queued in reversed(queue):
                    for rid, sampled in zip(queued.req_ids, queued.sampled_token_ids):
                        tokens_of.get(rid, []).extend(sampled)
                queue.appendleft((out, self.worker.execute(out, tokens_of)))
                if len(queue) < depth:
                    continue
            elif not queue:
                return
            out, result = queue.pop()
            for eco in self.scheduler.update_from_output(out, result).values():
                for o in eco.outputs:
                    self.outputs[o.request_id].extend(o.new_token_ids)
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

    def forget_local_prefix_cache(self) -> None:
        """vLLM's own prefix cache emptied, so the next hit can only come from kvstore."""
        if not self.scheduler.reset_prefix_cache():
            raise AssertionError("vLLM did not reset its prefix cache (requests still running)")

    def close(self) -> None:
        self.scheduler.shutdown()
        self.worker.close()


def truth(prompt: list[int], max_tokens: int) -> list[int]:
    """The outputs a run without any cache produces."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]
