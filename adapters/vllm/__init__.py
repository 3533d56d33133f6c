"""vLLM v1 KV connector over kvstore; see ``adapters.vllm.connector``.

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
      "kv_connector_module_path": "adapters.vllm.connector", "kv_role": "kv_both",
      "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"kvstore_url": "ipc:///run/kvstore/kvstore.sock"}}'
"""
