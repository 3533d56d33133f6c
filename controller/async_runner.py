"""AsyncRunner: one asyncio loop on a daemon thread, for a synchronous caller's async I/O.

The engine thread stays synchronous; L3 connectors are async. The runner owns
the loop they run on, so their connections live on one loop for their whole
life, and ``run`` blocks the caller until a coroutine finishes (or times out).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")


class AsyncRunner:
    def __init__(self, name: str = "kvstore-io") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pipelines' tasks run on."""
        return self._loop

    def run(self, coro: Awaitable[T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result; raises TimeoutError after ``timeout_s``.

        The timeout is applied on the loop and this call returns only once the
        coroutine has really stopped: a timed-out read can't go on writing into
        buffers that the caller reuses after the error.
        """
        future = asyncio.run_coroutine_threadsafe(_bounded(coro, timeout_s), self._loop)
        try:
            return future.result()
        except asyncio.TimeoutError:
            raise TimeoutError(f"L3 call did not finish within {timeout_s} s") from None

    def close(self) -> None:
        """Stop the loop after the work already queued; idempotent."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            # A call is stuck in a blocking step; closing a running loop would raise.
            return
        self._loop.close()


async def _bounded(coro: Awaitable[T], timeout_s: float | None) -> T:
    return await asyncio.wait_for(coro, timeout_s)
