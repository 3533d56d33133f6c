"""Hypothesis drives lookup / prefetch / store / release / evict / backup in any order
against a small L2 over a real L3 store; the host store's integrity is checked after
every step, and every page loaded holds the bytes its chain was stored with."""

import time

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from controller.config import ControllerConfig, L3Config, PrefetchConfig
from controller.embedded import EmbeddedController
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, page_size=2, dtype="float32")
NUM_CHAINS, CHAIN_PAGES = 4, 3
SCRATCH = list(range(40, 48))   # device pages loads go to


def chain_tokens(c: int) -> list[int]:
    return [1000 * (c + 1) + t for t in range(CHAIN_PAGES * LAYOUT.page_size)]


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.policy = "best_effort"
        config = ControllerConfig(
            host_pool_pages=5,
            l3=L3Config("memory", {}, write_policy="write_back", timeout_s=5.0,
                        backup_queue_bytes=4 * LAYOUT.page_bytes),
            prefetch=PrefetchConfig(policy=self.policy, batch_pages=2))
        self.pool = torch.zeros(LAYOUT.pool_shape(48))
        for c in range(NUM_CHAINS):   # chain c's page j lives in device page 3c+j, value 10c+j
            for j in range(CHAIN_PAGES):
                self.pool[:, :, 3 * c + j] = 10 * c + j
        self.ctl = EmbeddedController(config, KeyNamespace("stateful", LAYOUT), self.pool)
        self.held = []
        self.tickets = []

    @rule(c=st.integers(0, NUM_CHAINS - 1))
    def store(self, c):
        self.ctl.store(chain_tokens(c), [3 * c + j for j in range(CHAIN_PAGES)])

    @rule(c=st.integers(0, NUM_CHAINS - 1), load=st.booleans())
    def lookup(self, c, load):
        result = self.ctl.lookup(chain_tokens(c))
        if load and result.num_hit_pages:
            pages = SCRATCH[: result.num_hit_pages]
            self.ctl.load(result, pages).wait_all()
            for j, page in enumerate(pages):
                assert torch.all(self.pool[:, :, page] == 10 * c + j), f"chain {c} page {j}"
        self.held.append(result)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 7))
    def release(self, i):
        self.ctl.release(self.held.pop(i % len(self.held)))

    @rule(c=st.integers(0, NUM_CHAINS - 1))
    def prefetch(self, c):
        self.tickets.append(self.ctl.prefetch(chain_tokens(c)))

    @precondition(lambda self: self.tickets)
    @rule(cancel=st.booleans())
    def finish_a_prefetch(self, cancel):
        ticket = self.tickets.pop(0)
        if cancel:
            ticket.cancel()
        else:
            assert ticket.wait(10)
        assert ticket.num_ready + ticket.num_failed <= max(ticket.num_pages, ticket.num_ready)

    @rule()
    def drain_backups(self):
        assert self.ctl.drain_backups(10)

    @invariant()
    def integrity(self):
        with self.ctl._core.lock:
            self.ctl.check_integrity()

    def teardown(self):
        for result in self.held:
            self.ctl.release(result)
        for ticket in self.tickets:
            ticket.wait(10)
        # best_effort lookups start prefetches of their own (not in self.tickets): quiescent
        # means those have ended too (a read short of slots may still be reserving).
        prefetcher, deadline = self.ctl._core._prefetcher, time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.ctl._core.lock:
                if not prefetcher._running:
                    break
            time.sleep(0.005)
        self.ctl.drain_backups(10)
        self.ctl.check_integrity(quiescent=True)
        self.ctl.close()


PipelineMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_pipelines_stateful = PipelineMachine.TestCase
