"""The worker role of ``vllm_loop`` in a process of its own, as vLLM runs workers.

The parent runs vLLM's Scheduler (the scheduler-side connector); this process makes
its own VllmConfig, allocates the KV tensors with vLLM's code and runs the worker-side
connector. Scheduler outputs go over a pipe pickled, as vLLM's executor sends them;
the only shared cache is the kvstore daemon both connectors talk to.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any


def _serve(conn: Any, args: dict) -> None:
    import vllm_loop as vl

    runner = None
    try:
        vc = vl.vllm_config(args["model"], args["backend"], args["extra"], args["max_batched_tokens"],
                            args["max_model_len"])
        worker_cfg, _, kv = vl.allocate(vc, args["backend"], args["num_blocks"])
        runner = vl.Runner(vc, worker_cfg, kv, args["backend"])
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            try:
                conn.send(("ok", runner.execute(*msg)))
            except BaseException as exc:   # noqa: BLE001 - the parent re-raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    except BaseException as exc:   # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if runner is not None:
            runner.close()
        conn.close()


class RemoteWorker:
    """``Runner``'s interface over a pipe to a spawned worker process."""

    def __init__(self, **args: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, args), daemon=True)
        self._proc.start()
        self._expect("ready", timeout_s=300)

    def _expect(self, kind: str, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"the worker process did not answer in {timeout_s} s")
        got, payload = self._conn.recv()
        if got != kind:
            raise AssertionError(f"worker process failed:\n{payload}")
        return payload

    def execute(self, out: Any, tokens_of: dict) -> Any:
        self._conn.send((out, tokens_of))
        return self._expect("ok", timeout_s=120)

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
