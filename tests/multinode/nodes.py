"""Two kvstore "nodes" on one machine, sharing one distributed L3, for the multi-node tests.

A node is what runs on one host: a ``kvstore serve`` daemon (its own host pool, its own
ipc address, its own process) and the engines attached to it. Nothing of L2 is shared
between nodes; the L3 store (a Redis Cluster or a Mooncake Store, real servers started by
``l3_servers``) is::

    node A: engine A --ipc--> daemon A (L2 A) --+
                                                +--> Redis Cluster / Mooncake Store
    node B: engine B --ipc--> daemon B (L2 B) --+

Engines here are the reference decoder (``tiny``, float32 on CPU), whose output with a
cache equals recompute bit for bit; every request on node B is checked against a
cache-less engine.
"""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import l3_servers as servers
from daemon_proc import DaemonProcess, wait_until

from controller.client import DaemonClient
from controller.config import PrefetchConfig
from decoder.config import DecoderConfig
from decoder.engine import GenerationResult, ReferenceEngine
from decoder.model import ReferenceDecoder
from kvstore.page_keys import KeyNamespace, page_keys

PRESET = "tiny"
PAGE_SIZE = 16
CONFIG = DecoderConfig.preset(PRESET)
LAYOUT = CONFIG.kv_layout(PAGE_SIZE)
NAMESPACE = KeyNamespace(CONFIG.model_id, LAYOUT)
L3_TIMEOUT_S = 2.0
"""Each L3 call's limit in the daemons: a dead store costs a request at most this."""


def prompt(seed: int, num_tokens: int) -> list[int]:
    """A prompt of random tokens, the same in every process."""
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, num_tokens).tolist()


def l3_keys(tokens: list[int]) -> list[bytes]:
    """The page keys of a prompt's full pages: the keys its pages have in L3."""
    return [bytes(k) for k in page_keys(NAMESPACE.digest(), tokens, PAGE_SIZE)]


def l3_flags(connector: str, options: dict, write_policy: str = "write_through") -> list[str]:
    """`kvstore serve` flags for a shared L3. write_through: a page goes to L3 as soon as
    it is stored, so another node can find it (write_back would keep it in this node's
    L2 until evicted)."""
    return ["--l3-connector", connector, "--l3-options", json.dumps(options),
            "--l3-write-policy", write_policy, "--l3-timeout-s", str(L3_TIMEOUT_S)]


@contextlib.contextmanager
def shared_store(backend: str) -> Iterator[tuple[object, str, dict]]:
    """(the servers, connector name, connector options) of a fresh store; skips the test
    (naming what to install) if the backend's servers are not installed."""
    if backend == "redis_cluster":
        with servers.redis_cluster_or_skip() as cluster:
            # The key prefix as a config file gives it: text.
            yield cluster, "redis_cluster", {"startup_nodes": cluster.startup_nodes,
                                             "key_prefix": "fleet-1:"}
    elif backend == "mooncake":
        with servers.mooncake_or_skip(segment_bytes=64 << 20) as store:
            # A daemon is a pure client of the store: 16 MiB of transfer buffer holds a batch.
            yield store, "mooncake", {**store.client_options(), "local_buffer_size": 16 << 20}
    else:
        raise ValueError(backend)


def node_daemon(tmp_path: Path, name: str, l3_args: list[str], host_pages: int = 64) -> DaemonProcess:
    """Node ``name``'s daemon (not started), on an ipc address of its own."""
    return DaemonProcess(tmp_path, address=f"ipc://{tmp_path / name / 'kvstore.sock'}", name=name,
                         host_pages=host_pages, layout=LAYOUT, args=l3_args)


@contextlib.contextmanager
def two_nodes(tmp_path: Path, l3_args: list[str], host_pages: int = 64):
    """Daemons A and B over one shared L3, started side by side and stopped (SIGTERM) on exit."""
    nodes = [node_daemon(tmp_path, name, l3_args, host_pages) for name in ("nodeA", "nodeB")]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes:            # both flush at once
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes:
            node.stop()


def wait_written(node: DaemonProcess, timeout_s: float = 20.0) -> dict:
    """Wait until the node's daemon holds no page that L3 lacks (its write-through is done)."""
    stats: dict = {}

    def done() -> bool:
        stats.update(node.stats())
        return stats["num_due_pages"] == 0 and stats["num_backup_queue_pages"] == 0

    assert wait_until(done, timeout_s), f"node's L3 writes did not finish: {stats}"
    return stats


@dataclass
class Checked:
    """One request on an engine with a cache, and whether it equals recompute."""

    result: GenerationResult
    exact: bool


class NodeEngine:
    """A reference-decoder engine attached to one node's daemon, beside a cache-less twin
    (same weights) that recomputes every prompt for the bit-for-bit check."""

    def __init__(self, model: ReferenceDecoder, node: DaemonProcess, num_device_pages: int = 96) -> None:
        self.cached = ReferenceEngine(model, LAYOUT, num_device_pages)
        self.plain = ReferenceEngine(model, LAYOUT, num_device_pages)
        # wait_complete: a lookup returns once every page L3 holds is in L2, so what the
        # test counts as an L3 hit does not depend on timing.
        self.client = DaemonClient(node.address, NAMESPACE, self.cached.kv_pool,
                                   prefetch=PrefetchConfig(policy="wait_complete"),
                                   request_timeout_s=5.0)
        self.cached.attach_cache(self.client)

    def run(self, tokens: list[int], new_tokens: int = 2) -> Checked:
        hit = self.cached.generate(tokens, new_tokens)
        miss = self.plain.generate(tokens, new_tokens)
        return Checked(hit, hit.tokens == miss.tokens and torch.equal(hit.logits, miss.logits))

    def close(self) -> None:
        self.cached.attach_cache(None)
        self.client.close()


def tiny_model() -> ReferenceDecoder:
    torch.set_num_threads(1)
    return ReferenceDecoder(CONFIG, device=torch.device("cpu"))
