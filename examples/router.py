"""A KV-aware router: send each request to the node whose cache holds the longest prefix of it,
decided from the nodes' KV events alone.

    router = PrefixRouter([("ipc:///run/a-events.sock", "ipc:///run/a-replay.sock"),
                           ("ipc:///run/b-events.sock", "ipc:///run/b-replay.sock")])
    keys = page_keys(namespace.digest(), prompt_tokens, page_size)   # as the engines do
    node = router.route(keys)            # index into the list above
    router.refresh()                     # apply the events that arrived meanwhile

Each node's events rebuild which page keys its host memory holds
(controller/events/subscriber.py); the page keys of a prompt are the block hashes
of the events, so the longest cached prefix on a node is its leading run of keys
the node holds. Ties (no node holds anything, or several hold as much) go to the
node that served the fewest of the last ``window`` requests, then round robin.
bench/router.py runs it against round robin on the agent trace generator.
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path
from typing import Sequence

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.events.subscriber import EventSubscriber  # noqa: E402
from controller.events.wire import MEDIUM_L2  # noqa: E402
from kvstore.page_keys import PageKey  # noqa: E402


class PrefixRouter:
    """Longest cached prefix first, least recently loaded on ties; see the module docstring."""

    def __init__(self, nodes: Sequence[tuple[str, str | None]], window: int = 64,
                 medium: str = MEDIUM_L2) -> None:
        if not nodes:
            raise ValueError("PrefixRouter needs at least one node (events, replay) address pair")
        self._context = zmq.Context()
        self.subscribers = [EventSubscriber(events, replay, context=self._context)
                            for events, replay in nodes]
        self.medium = medium
        self._recent: deque[int] = deque(maxlen=window)
        self._load = [0] * len(nodes)
        self._next = 0

    def refresh(self, wait_s: float = 0.0, node: int | None = None) -> int:
        """Apply the events that have arrived (waiting up to ``wait_s`` for ``node``'s
        next batch, or any node's); the number of batches applied."""
        applied = 0
        for i, sub in enumerate(self.subscribers):
            applied += sub.poll(wait_s if node in (None, i) else 0.0)
        return applied

    def catch_up(self) -> None:
        """Learn what every node already holds from its replay socket (at start)."""
        for sub in self.subscribers:
            sub.catch_up()

    def matches(self, keys: Sequence[PageKey]) -> list[int]:
        """Per node, how many leading pages of ``keys`` its cache holds."""
        return [sub.view.num_leading(keys, self.medium) for sub in self.subscribers]

    def route(self, keys: Sequence[PageKey]) -> int:
        """The node for a request whose prompt has page keys ``keys``."""
        matched = self.matches(keys)
        best = max(matched)
        n = len(matched)
        candidates = [i for i in range(n) if matched[i] == best]
        node = min(candidates, key=lambda i: (self._load[i], (i - self._next) % n))
        self._next = (node + 1) % n
        if len(self._recent) == self._recent.maxlen:
            self._load[self._recent[0]] -= 1
        self._recent.append(node)
        self._load[node] += 1
        return node

    def close(self) -> None:
        for sub in self.subscribers:
            sub.close()
        self._context.term()


class RoundRobin:
    """The baseline: node i, i + 1, ... regardless of contents."""

    def __init__(self, num_nodes: int) -> None:
        self.num_nodes, self._next = num_nodes, 0

    def route(self, keys: Sequence[PageKey]) -> int:
        node, self._next = self._next, (self._next + 1) % self.num_nodes
        return node
