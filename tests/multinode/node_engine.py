"""Node A's engine as a process of its own: ``python node_engine.py ADDRESS FIRST_SEED COUNT LEN``.

Runs the reference decoder (``tiny``) with the node's daemon as its cache on the prompts
``prompt(seed, LEN)`` for seed in FIRST_SEED .. FIRST_SEED+COUNT-1, one after the other,
and prints one JSON line per request (its seed and the prompt tokens the cache served).
The multi-node tests kill it (SIGKILL) in the middle, with its daemon.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
for _dir in ("connectors", "daemon"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", _dir))

from nodes import LAYOUT, NAMESPACE, prompt, tiny_model  # noqa: E402

from controller.client import DaemonClient  # noqa: E402
from decoder.engine import ReferenceEngine  # noqa: E402


def main(address: str, first_seed: int, count: int, length: int) -> int:
    engine = ReferenceEngine(tiny_model(), LAYOUT, 96)
    cache = DaemonClient(address, NAMESPACE, engine.kv_pool, client_name="node-a-engine")
    engine.attach_cache(cache)
    try:
        for seed in range(first_seed, first_seed + count):
            out = engine.generate(prompt(seed, length), 1)
            print(json.dumps({"seed": seed, "cached": out.num_cached_tokens}), flush=True)
    finally:
        engine.attach_cache(None)
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
