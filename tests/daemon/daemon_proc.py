"""A real ``kvstore serve`` subprocess for tests: started, waited for, always stopped.

    with running_daemon(tmp_path, host_pages=64) as daemon:
        client = daemon.client(device_pool)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from controller.client import Credentials, DaemonClient, Session
from controller.daemon import protocol as p
from controller.daemon.launch import layout_flags, wait_until_serving
from kvstore.layout import KVLayout
from kvstore.page_keys import KeyNamespace

REPO = Path(__file__).resolve().parents[2]
LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
NAMESPACE = KeyNamespace("daemon-test-model", LAYOUT)
START_TIMEOUT_S = 60.0


def layout_args(layout: KVLayout = LAYOUT) -> list[str]:
    return layout_flags(layout)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


class DaemonProcess:
    def __init__(self, tmp_path: Path, *, address: str | None = None, host_pages: int = 64,
                 args: list[str] | tuple = (), env: dict[str, str] | None = None,
                 token: bytes = b"", name: str = "daemon", layout: KVLayout | None = LAYOUT) -> None:
        """``layout`` None: a daemon of every layout (no --layout-*, no --host-pool-pages)."""
        self.layout = layout
        self.address = address or f"ipc://{tmp_path / 'run' / 'kvstore.sock'}"
        self.log_path = tmp_path / f"{name}.log"
        self.token = token
        fixed = ["--host-pool-pages", str(host_pages), *layout_args(layout)] if layout else []
        self.cmd = [sys.executable, "-m", "controller.cli", "serve", "--address", self.address,
                    *fixed, *args]
        self.env = child_env(**(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        try:
            wait_until_serving(self.address, self.proc, START_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal the daemon and wait; kill -9 if it does not exit in time. Its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        code, self.proc = self.proc.returncode, None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def session(self, **kwargs) -> Session:
        fingerprint = self.layout.fingerprint() if self.layout is not None else None
        return Session(self.address, fingerprint, credentials=Credentials(token=self.token), **kwargs)

    def client(self, device_pool: torch.Tensor, namespace: KeyNamespace = NAMESPACE,
               **kwargs) -> DaemonClient:
        kwargs.setdefault("credentials", Credentials(token=self.token))
        return DaemonClient(self.address, namespace, device_pool, **kwargs)

    def stats(self) -> dict:
        session = self.session(request_timeout_s=5.0)
        try:
            reply = session.call(p.GetStats())
            assert type(reply) is p.StatsReply, reply
            return reply.stats
        finally:
            session.close()

    def check_integrity(self, quiescent: bool = False) -> None:
        session = self.session(request_timeout_s=10.0)
        try:
            reply = session.call(p.CheckIntegrity(quiescent))
            assert type(reply) is p.OkReply, reply
        finally:
            session.close()


@contextlib.contextmanager
def running_daemon(tmp_path: Path, **kwargs):
    daemon = DaemonProcess(tmp_path, **kwargs)
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def device_pool(num_pages: int = 64, seed: int | None = None) -> torch.Tensor:
    if seed is None:
        return torch.zeros(LAYOUT.pool_shape(num_pages))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.pool_shape(num_pages), generator=gen)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def run_worker(daemon: DaemonProcess, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).with_name("daemon_worker.py")),
                           daemon.address, *args], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


def spawn_worker(daemon: DaemonProcess, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("daemon_worker.py")),
                             daemon.address, *args], env=child_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int):
    """A real file system of ``size_bytes`` mounted at ``path`` (a tmpfs: writes past its
    size fail with ENOSPC, as on a full disk); unmounted after. Needs root (CAP_SYS_ADMIN);
    skips the test otherwise."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
