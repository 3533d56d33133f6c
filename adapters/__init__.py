"""Engine plug-ins over kvstore's client API.

- ``adapters.sglang``: ``KVStoreHiCacheStorage``, a SGLang HiCache storage backend (SGLang's L3).
- ``adapters.vllm``: ``KVStoreConnector``, a vLLM v1 KV connector.
- ``adapters.keyed``: ``KeyedCache``, the page-key level access both use (keys given
  directly, bytes moved between the engine's own host or device memory and kvstore's
  L2 slots), embedded or against a daemon.

Nothing here is imported by the core, and importing ``adapters`` imports no engine:
each engine module imports its engine when it is itself imported.
"""
