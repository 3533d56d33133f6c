"""Real store servers for the connector tests, on free 127.0.0.1 ports.

Each helper starts the server as a child process, waits until it answers, and
stops it (kill, then wait) on exit. A missing binary is a pytest skip that
names what to install; anything else that fails is an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

HOST = "127.0.0.1"


def free_port(also_free_offset: int = 0) -> int:
    """A port free on 127.0.0.1 now (and port+offset too, for cluster buses)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not also_free_offset:
            return port
        if port + also_free_offset < 65536 and _is_free(port + also_free_offset):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_for(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout_s}s")


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGKILL when the process that started it
    dies (Linux PR_SET_PDEATHSIG), so a crashed test run leaves no servers."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _which(name: str) -> str | None:
    """A program on PATH or beside this interpreter (a venv's bin/ is often not on PATH)."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def _require_binary(name: str, install: str) -> str:
    path = _which(name)
    if path is None:
        pytest.skip(f"{name} not installed ({install})")
    return path


# ---------------------------------------------------------------- redis
@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1:port without persistence."""

    port: int
    workdir: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        cmd = [shutil.which("redis-server"), "--port", str(self.port), "--bind", HOST,
               "--save", "", "--appendonly", "no", "--dir", self.workdir,
               "--protected-mode", "yes", "--loglevel", "warning", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        wait_for(lambda: self.cli("PING") == "PONG", 10, f"redis-server :{self.port}", self.proc)
        return self

    def cli(self, *args: str) -> str:
        out = subprocess.run([shutil.which("redis-cli"), "-h", HOST, "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def kill9(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        stop_process(self.proc)


@contextlib.contextmanager
def redis_server_or_skip(extra: list[str] | None = None):
    _require_binary("redis-server", "apt-get install -y redis-server")
    _require_binary("redis-cli", "apt-get install -y redis-tools")
    with tempfile.TemporaryDirectory(prefix="kv-redis-") as tmp:
        srv = RedisServer(free_port(), tmp, extra or [])
        try:
            yield srv.start()
        finally:
            srv.stop()


@dataclass
class RedisCluster:
    nodes: list[RedisServer]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]


@contextlib.contextmanager
def redis_cluster_or_skip(num_nodes: int = 3):
    """A num_nodes-master Redis Cluster made with redis-cli --cluster create."""
    _require_binary("redis-server", "apt-get install -y redis-server")
    cli = _require_binary("redis-cli", "apt-get install -y redis-tools")
    with tempfile.TemporaryDirectory(prefix="kv-rcluster-") as tmp:
        nodes = []
        try:
            for i in range(num_nodes):
                port = free_port(also_free_offset=10000)
                d = os.path.join(tmp, str(i))
                os.makedirs(d)
                nodes.append(RedisServer(port, d, [
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000"]).start())
            addrs = [f"{HOST}:{n.port}" for n in nodes]
            out = subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            for n in nodes:
                wait_for(lambda n=n: "cluster_state:ok" in n.cli("CLUSTER", "INFO"), 20,
                         f"cluster node :{n.port}")
            yield RedisCluster(nodes)
        finally:
            for n in nodes:
                n.stop()


def python_exe() -> str:
    return sys.executable


# ---------------------------------------------------------------- mooncake
# A storage process: joins the cluster, mounts `segment` bytes, waits for SIGTERM.
_MOONCAKE_STORAGE = """
import signal, sys
from mooncake.store import MooncakeDistributedStore
store = MooncakeDistributedStore()
rc = store.setup("127.0.0.1", "P2PHANDSHAKE", int(sys.argv[2]), 16 << 20, "tcp", "", sys.argv[1])
if rc != 0:
    sys.exit(f"setup failed: {rc}")
print("READY", flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
store.close()
"""


@dataclass
class MooncakeCluster:
    """mooncake_master (RPC and metrics bound to 127.0.0.1) plus one storage process."""

    workdir: str
    segment_bytes: int
    rpc_port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def master_addr(self) -> str:
        return f"{HOST}:{self.rpc_port}"

    def client_options(self) -> dict:
        return {"master_addr": self.master_addr}

    def start(self) -> "MooncakeCluster":
        self.rpc_port = free_port()
        master = [_which("mooncake_master"), f"--rpc_port={self.rpc_port}",
                  f"--rpc_address={HOST}", f"--metrics_host={HOST}",
                  f"--metrics_port={free_port()}", "--enable_http_metadata_server=false"]
        self.procs.append(self._spawn(master, "master.log"))
        wait_for(lambda: not _is_free(self.rpc_port), 20, "mooncake_master", self.procs[0])
        storage = [sys.executable, "-c", _MOONCAKE_STORAGE, self.master_addr, str(self.segment_bytes)]
        proc = self._spawn(storage, "storage.log")
        self.procs.append(proc)
        log = os.path.join(self.workdir, "storage.log")
        wait_for(lambda: "READY" in open(log).read(), 30, "mooncake storage process", proc)
        return self

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        env = {**os.environ, "MC_TCP_BIND_ADDRESS": HOST, "MC_LOG_DIR": self.workdir}
        with open(os.path.join(self.workdir, log_name), "wb") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.workdir, preexec_fn=_die_with_parent)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()


@contextlib.contextmanager
def mooncake_or_skip(segment_bytes: int = 512 << 20):
    """A Mooncake master + storage process on 127.0.0.1 (P2P handshake, tcp)."""
    _require_binary("mooncake_master", "pip install mooncake-transfer-engine-non-cuda; "
                    "apt-get install -y libibverbs1")
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mooncake.store not importable ({exc}): apt-get install -y libibverbs1")
    with tempfile.TemporaryDirectory(prefix="kv-mooncake-") as tmp:
        cluster = MooncakeCluster(tmp, segment_bytes)
        try:
            yield cluster.start()
        finally:
            cluster.stop()
