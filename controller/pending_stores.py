"""PendingStores: stores whose device-to-host copy is still running, published in order.

On CUDA a store returns once its copy is enqueued (``DevicePool.start_save``); its
slots stay reserved and invisible until the copy has completed. Both clients keep
their stores in flight here and publish them oldest first (one write stream
completes them in that order), stopping at the first still running; a lookup of
tokens whose pages are in flight waits for those stores, since a miss would cost
a recompute while the bytes are almost there.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, NamedTuple

from controller.device_pool import SaveCopy
from kvstore.page_keys import PageKey


class PendingStore(NamedTuple):
    keys: list[PageKey]
    plan: Any
    """What the client needs to publish or abort it (a StorePlan, a daemon reservation)."""
    copy: SaveCopy


class PendingStores:
    """Stores in flight; ``publish`` commits each once its copy is over (``abort`` when
    the copy failed, then re-raises)."""

    def __init__(self, publish: Callable[[PendingStore], None],
                 abort: Callable[[PendingStore], None]) -> None:
        self._publish = publish
        self._abort = abort
        self._queue: deque[PendingStore] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, store: PendingStore) -> None:
        self._queue.append(store)

    def publish_done(self, wait: bool = False, wanted: Iterable[PageKey] | None = None) -> None:
        """Publish the stores whose copies have completed, stopping at the first still in
        flight. ``wait``: block until all have; ``wanted`` (a lookup's keys): block for
        the stores holding any of them."""
        num_wait = len(self._queue) if wait else self._num_holding(wanted)
        num_done = 0
        while self._queue:
            head = self._queue[0]
            try:
                if not head.copy.is_done():
                    if num_done >= num_wait:
                        return
                    head.copy.wait()
            except BaseException:
                self._queue.popleft()
                self._abort(head)
                raise
            self._queue.popleft()
            self._publish(head)
            num_done += 1

    def _num_holding(self, wanted: Iterable[PageKey] | None) -> int:
        """1 + the position of the newest store holding a wanted page, or 0."""
        if wanted is None or not self._queue:
            return 0
        wanted = set(wanted)
        holding = [i for i, store in enumerate(self._queue) if not wanted.isdisjoint(store.keys)]
        return holding[-1] + 1 if holding else 0
