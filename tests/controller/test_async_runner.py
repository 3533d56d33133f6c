import asyncio

import pytest

from controller.async_runner import AsyncRunner


def test_results_and_errors_come_back():
    runner = AsyncRunner()

    async def add(a, b):
        await asyncio.sleep(0)
        return a + b

    async def fail():
        raise ValueError("boom")

    assert runner.run(add(2, 3)) == 5
    with pytest.raises(ValueError, match="boom"):
        runner.run(fail())
    runner.close()
    runner.close()


def test_a_timed_out_call_has_stopped_when_run_raises():
    """The caller frees buffers after a timeout: the coroutine's clean-up must be over by then."""
    runner = AsyncRunner()
    buffer = bytearray(1)

    async def slow_reader():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # e.g. waiting for a decode thread to let go of the buffer
            buffer[0] = 1
            raise

    with pytest.raises(TimeoutError):
        runner.run(slow_reader(), timeout_s=0.05)
    assert buffer[0] == 1
    runner.close()
