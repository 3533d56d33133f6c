"""Tenants that cannot touch each other's memory (issue 19, part 2): two OS users on one
daemon, each a tenant named from its uid, each with a segment only it can map."""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from controller.api import CacheError
from controller.daemon.config import default_pool_bytes
from controller.daemon.fd_broker import FdBroker
from controller.status_cli import format_stats
from controller.tenant_link import receive_segment
from daemon_proc import REPO, DaemonProcess, child_env, running_daemon, wait_until

USERS = ("kvt-x", "kvt-y")
WORKER = Path(__file__).with_name("tenant_worker.py")


def _ensure_users() -> dict[str, pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test creates two OS users and runs a client as each")
    if shutil.which("useradd") is None:
        pytest.skip("needs useradd to create the two test users")
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            name], check=True, capture_output=True)
    return {name: pwd.getpwnam(name) for name in (*USERS, "nobody")}


def _as(user: pwd.struct_passwd, address: str, *args: str) -> dict:
    env = child_env(HOME=tempfile.gettempdir(), PYTHONPATH=f"{REPO}{os.pathsep}{WORKER.parent}")
    # Started as root, the worker drops to the user itself once loaded (tenant_worker.become).
    done = subprocess.run([sys.executable, str(WORKER), "--as", f"{user.pw_uid}:{user.pw_gid}",
                           address, *args], env=env, cwd="/", capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shared_dir():
    """A directory other users may enter (not list): where a shared daemon's socket lives."""
    path = Path(tempfile.mkdtemp(prefix="kvt-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_users_cannot_reach_each_others_pages(tmp_path, shared_dir):
    users = _ensure_users()
    x, y, nobody = users["kvt-x"], users["kvt-y"], users["nobody"]
    port = _free_port()
    tenants = json.dumps({f"uid:{x.pw_uid}": {"l2_pages": 8}})
    address = f"ipc://{shared_dir / 'kvstore.sock'}"
    # No layout, no budget: `kvstore serve` as it starts by default (plus the tenants).
    with running_daemon(tmp_path, layout=None, address=address, args=[
            "--allow-users", f"{x.pw_name},{y.pw_name}",
            "--tenants", tenants, "--metrics-port", str(port)]) as daemon:
        stored = _as(y, address, "store", "1", "1")
        assert stored == {"uid": y.pw_uid, "tenant": f"uid:{y.pw_uid}", "stored": [8]}

        probe = _as(x, address, "probe", str(daemon.proc.pid))
        assert probe["tenant"] == f"uid:{x.pw_uid}"
        assert probe["lookup_hit"] == 0              # Y's keys, sent by X: not Y's pages
        assert probe["shm_names"] == []              # no segment has a name to guess
        assert probe["opened_daemon_files"] == [] and probe["daemon_fds_listed"] == 0
        assert probe["read_daemon_mem"] is False
        # X stored 24 pages over its quota of 8 (evicting its own pages, never Y's), then
        # wrote all over its own segment.
        assert probe["stored"] == [8, 8, 8] and probe["scribbled_bytes"] > 0
        loaded = _as(y, address, "load", "1")
        assert loaded == {"uid": y.pw_uid, "hit": 8, "exact": True}

        refused = _as(nobody, address, "attach")
        assert refused["attached"] is False and "--allow-users" in refused["error"]

        stats = daemon.stats()    # the daemon's own user sees every tenant
        assert stats["budget_bytes"] == default_pool_bytes()
        tenants = {t["tenant"]: t for t in json.loads(stats["tenants"])}
        tx, ty = tenants[f"uid:{x.pw_uid}"], tenants[f"uid:{y.pw_uid}"]
        assert tx["l2_pages"] <= 8 and tx["l2_quota_pages"] == 8
        assert ty["l2_pages"] == 8 and ty["l2_quota_pages"] == 0
        pools = {p["tenant"]: p for p in json.loads(stats["pools"])}
        assert pools[f"uid:{x.pw_uid}"]["evicted_quota"] >= 8 and pools[f"uid:{y.pw_uid}"]["evicted_quota"] == 0
        assert f"tenant   uid:{x.pw_uid}: L2" in format_stats(stats)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'kvstore_tenant{{kind="l2_quota_pages",tenant="uid:{x.pw_uid}"}} 8.0' in metrics
        daemon.check_integrity(quiescent=True)


def test_a_segment_secret_is_bound_to_its_user_and_used_once(tmp_path):
    """The side socket hands a segment only to a process of the uid it was granted to."""
    broker = FdBroker(tmp_path / "side.fd", {os.getuid()})
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096)
    try:
        other = broker.grant(os.getuid() + 1, fd, 4096)
        with pytest.raises(CacheError, match="issued to another user"):
            receive_segment(str(broker.path), other, 4096)
        mine = broker.grant(os.getuid(), fd, 4096)
        mapped = receive_segment(str(broker.path), mine, 4096)
        assert len(mapped) == 4096
        mapped.close()
        with pytest.raises(CacheError, match="unknown or expired"):
            receive_segment(str(broker.path), mine, 4096)   # one use
        with pytest.raises(CacheError, match="unknown or expired"):
            receive_segment(str(broker.path), os.urandom(16), 4096)
    finally:
        broker.close()
        os.close(fd)


def test_tcp_tenants_by_token_see_only_their_own_pages_in_l2_and_l3(tmp_path):
    """On tcp a tenant is its token; a token of no tenant is refused (no shared token set).
    Their pages reach the shared L3 (a disk store) under keys salted apart."""
    from controller.client import Credentials
    from daemon_proc import device_pool

    tokens = {"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
    env = {"KVSTORE_TENANTS": json.dumps({k: {"token": v} for k, v in tokens.items()})}
    address = f"tcp://127.0.0.1:{_free_port()}"
    l3 = ["--l3-connector", "disk", "--l3-options", json.dumps({"path": str(tmp_path / "l3"), "capacity_bytes": 1 << 24}),
          "--l3-write-policy", "write_through"]
    with running_daemon(tmp_path, layout=None, address=address, env=env, args=l3) as daemon:
        prompt = list(range(32))
        alpha = daemon.client(device_pool(seed=3), credentials=Credentials(token=tokens["alpha"].encode()))
        assert alpha._link.session.hello.tenant == "alpha"
        assert alpha.store(prompt, range(8)).num_new_pages == 8
        assert alpha.lookup(prompt).num_hit_pages == 8
        beta = daemon.client(device_pool(), credentials=Credentials(token=tokens["beta"].encode()))
        assert beta._link.session.hello.tenant == "beta"
        assert beta.lookup(prompt).num_hit_pages == 0    # the same model and prompt: alpha's pages
        with pytest.raises(CacheError, match="unauthorized"):
            daemon.client(device_pool(), credentials=Credentials(token=b"no-such-tenant-token"),
                          request_timeout_s=5)
        alpha.close()
        beta.close()
    # A new daemon over the same L3: alpha's pages come up from it; beta's keys miss.
    with running_daemon(tmp_path, layout=None, address=address, env=env, args=l3,
                        name="daemon2") as daemon:
        beta = daemon.client(device_pool(), credentials=Credentials(token=tokens["beta"].encode()))
        assert beta.lookup(prompt).num_hit_pages == 0
        beta.close()
        dst = device_pool()
        alpha = daemon.client(dst, credentials=Credentials(token=tokens["alpha"].encode()))
        hit = alpha.lookup(prompt)
        assert hit.num_hit_pages == 8 and hit.num_l3_pages == 8
        alpha.load(hit, range(8)).wait_all()
        alpha.release(hit)
        assert dst[:, :, :8].numpy().tobytes() == device_pool(seed=3)[:, :, :8].numpy().tobytes()
        alpha.close()


def test_curve_keys_name_tenants(tmp_path):
    """On tcp with CURVE, a client's key names its tenant: a listed key its tenant, another
    admitted key a tenant of its own; their pages stay apart."""
    import zmq.auth

    from controller.client import Credentials
    from daemon_proc import device_pool

    certs, public = tmp_path / "certs", tmp_path / "public"
    certs.mkdir()
    public.mkdir()
    files = {name: zmq.auth.create_certificates(str(certs), name) for name in ("server", "alpha", "beta")}
    for name in ("alpha", "beta"):
        shutil.copy(files[name][0], public)
    alpha_key = zmq.auth.load_certificate(files["alpha"][0])[0].decode()
    beta_key = zmq.auth.load_certificate(files["beta"][0])[0].decode()
    env = {"KVSTORE_TENANTS": json.dumps({"alpha": {"curve_public_key": alpha_key}})}
    address = f"tcp://127.0.0.1:{_free_port()}"
    args = ["--auth-curve-secret-key-file", files["server"][1], "--auth-curve-public-keys-dir", str(public)]

    def creds(name):
        return Credentials(curve_server_public_key_file=files["server"][0],
                           curve_client_secret_key_file=files[name][1])

    daemon = DaemonProcess(tmp_path, layout=None, address=address, env=env, args=args)
    daemon.start(wait=False)   # its readiness probe pings without CURVE: wait for the log
    try:
        assert wait_until(lambda: "L3:" in daemon.log(), 60), daemon.log()
        prompt = list(range(32))
        alpha = daemon.client(device_pool(seed=5), credentials=creds("alpha"))
        assert alpha._link.session.hello.tenant == "alpha"
        assert alpha.store(prompt, range(8)).num_new_pages == 8
        beta = daemon.client(device_pool(), credentials=creds("beta"))
        assert beta._link.session.hello.tenant == f"curve:{beta_key[:16]}"
        assert beta.lookup(prompt).num_hit_pages == 0
        assert alpha.lookup(prompt).num_hit_pages == 8
        alpha.close()
        beta.close()
    finally:
        daemon.stop()
