"""SGLang HiCache storage backend over kvstore; see ``adapters.sglang.backend``.

Load it without patching SGLang::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "kvstore", "module_path": "adapters.sglang.backend",
        "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
        "kvstore_url": "ipc:///run/kvstore/kvstore.sock"}'
"""
