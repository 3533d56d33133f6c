"""What vLLM 0.33.0 does with our connector on hybrid models, pinned to its own code: the
connector does not subclass ``SupportsHMA`` (README, "Hybrid models": what it would take),
so vLLM's config turns its hybrid KV cache manager off whenever the connector is selected,
and its scheduler takes the one-group ``request_finished`` path. Declaring ``SupportsHMA``
without serving several KV cache groups would keep the manager on for sliding-window
models, which then get per-group block ids the connector does not handle: this test fails
first if the class starts claiming it."""

import pytest

from engine_imports import import_engine

import_engine("vllm.v1.core.sched.scheduler")   # skip without vLLM; under CI, fail

import vllm_loop as vl  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma  # noqa: E402

from adapters.vllm.connector import KVStoreConnector  # noqa: E402

pytestmark = pytest.mark.vllm


def test_the_connector_does_not_claim_hma_and_vllm_turns_the_manager_off(tmp_path):
    assert not supports_hma(KVStoreConnector)
    assert not KVConnectorFactory.supports_hma_config(vl.kv_transfer_config({}))
    vc = vl.vllm_config(vl.model_dir(tmp_path, False), "FLASH_ATTN", {})
    assert vc.scheduler_config.disable_hybrid_kv_cache_manager is True
