"""Starting a `kvstore serve` process from Python: its command line and its readiness.

For demos, benches and tests that run a daemon of their own::

    proc = subprocess.Popen(serve_command(address, layout, host_pages=1024))
    wait_until_serving(address, proc, timeout_s=60)
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Sequence

from controller.api import CacheError
from controller.daemon.address import parse_address
from kvstore.layout import KVLayout


def serve_command(address: str, layout: KVLayout, host_pages: int, extra: Sequence[str] = ()) -> list[str]:
    """`python -m controller.cli serve` for ``layout`` on ``address`` (``extra`` flags last win)."""
    return [sys.executable, "-m", "controller.cli", "serve", "--address", address,
            "--host-pool-pages", str(host_pages), *layout_flags(layout), *extra]


def layout_flags(layout: KVLayout) -> list[str]:
    """The `kvstore serve` flags that name ``layout`` (MLA included)."""
    flags = ["--layout-num-layers", str(layout.num_layers), "--layout-num-kv-heads",
             str(layout.num_kv_heads), "--layout-head-dim", str(layout.head_dim),
             "--layout-page-size", str(layout.page_size), "--layout-dtype", layout.dtype]
    if layout.is_mla:
        flags += ["--layout-is-mla", "true"]
    return flags


def wait_until_serving(address: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Return once a daemon answers a Ping on ``address``; RuntimeError if ``proc`` exits
    first or ``timeout_s`` passes. (A bare channel, not a Session: a daemon that is not
    up yet is expected here, not an outage to report.)"""
    import zmq

    from controller.client import Channel, Credentials
    from controller.daemon import protocol as p

    context = zmq.Context()
    channel = Channel(parse_address(address).url, Credentials(), context)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"kvstore serve exited with status {proc.returncode} before serving")
            try:
                channel.request(p.Ping(), b"", 0.3)
                return
            except CacheError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvstore serve did not answer on {address} within "
                                       f"{timeout_s} s") from None
                time.sleep(0.1)
    finally:
        channel.reset()
        context.term()
